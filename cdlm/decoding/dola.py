"""DoLa, decoding by contrasting layers (Chuang et al. 2023), as a ``custom_generate`` callable for transformers 5.

At every step DoLa reads next-token distributions off several *premature* layers of the model (the
"early exit": the LM head applied to an intermediate hidden state), picks the one whose distribution
is furthest from the final layer's (a Jensen-Shannon-type divergence, chosen per sequence and per
step), and scores each token by how much the final layer raised its log-probability over that layer:

    score(v) = log q_final(v) - log q_premature(v)   if q_final(v) >= relative_top * max_u q_final(u)
               -inf                                   otherwise

Tokens the final layer finds implausible are excluded (the "adaptive plausibility constraint").
The scores then go through the usual logits processors (repetition penalty, ...) and argmax (or
sampling when ``do_sample``).

transformers moved DoLa out of core after 4.55. With the defaults (``dola_form="transformers"``) this
module reproduces 4.55.4's ``generate(dola_layers=...)`` token for token at batch 1
(``tests/test_dola.py`` checks a recorded fixture), including its layer sets for ``"low"``/``"high"``
and its reading of premature layers. Where 4.55.4 departs from the paper, this module documents it
and offers the paper's form:

* **Per-row layer choice.** 4.55.4 averages the divergence over the batch and contrasts every row
  with the same layer; here each row picks its own layer, as the paper defines DoLa, so a row's
  tokens do not depend on what else is in its batch (batched == unbatched).
* **Premature logits.** 4.55.4 applies the bare LM head to the raw premature hidden states (no final
  norm, and no final logit soft-capping on Gemma-style models), while the final layer's logits pass
  through the final norm (and soft-capping). ``dola_form="paper"`` reads every layer the same way:
  final norm, then head (and soft-capping), i.e. the paper's ``softmax(phi(h_j))`` with the model's
  whole output map as ``phi``.
* **Divergence.** The paper selects ``argmax_j JSD(q_final || q_j)``. 4.55.4 (like the authors'
  released code) computes ``0.5 * (KL(m || q_final) + KL(m || q_j))`` with ``m`` the midpoint, i.e.
  both KL terms reversed, averaged over the vocabulary. ``"transformers"`` keeps that for token
  identity; ``"paper"`` uses the true Jensen-Shannon divergence.
* **Layer lists.** 4.55.4 silently drops listed layers ``>= num_hidden_layers`` and lets negative
  indices wrap around (``-1`` is the *final* layer); here both are a ``ValueError``.

Only the forward pass generation runs anyway is used: ``output_hidden_states=True`` exposes every
layer's output, and the LM head runs on the last position of the candidate layers only.

Use it through ``generate()``::

    out = model.generate(input_ids, custom_generate=cdlm.decoding.dola, dola_layers="high",
                         repetition_penalty=1.2, max_new_tokens=64)

or call :func:`dola_generate`, which does the same with explicit arguments.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from cdlm.decoding.custom_generate import make_module_callable, split_model_kwargs, stop_strings_as_criterion
from cdlm.decoding.dola_settings import (  # shared with the registry, which must not import torch
    DEFAULT_DOLA_LAYERS,
    DEFAULT_RELATIVE_TOP,
    DEFAULT_REPETITION_PENALTY,
    DOLA_FORMS,
    candidate_layers,
    parse_dola_layers,
    validate_dola_params,
)
from cdlm.models.lm_head import depth_and_tying, head_logits

__all__ = [
    "DOLA_FORMS",
    "candidate_layers",
    "dola",
    "dola_contrast",
    "dola_generate",
    "validate_dola_params",
]


def _layer_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor, form: str) -> torch.Tensor:
    """Divergence of each premature distribution from the final one: (C, B, V), (B, V) -> (C, B).

    ``m`` is the midpoint of the two distributions. ``"paper"``: Jensen-Shannon,
    ``0.5 * (KL(q_final || m) + KL(q_j || m))`` summed over the vocabulary. ``"transformers"``: 4.55.4's
    ``0.5 * (KL(m || q_final) + KL(m || q_j))`` with each term averaged over the vocabulary; both are
    computed the way 4.55.4 does (torch's ``kl_div`` term-wise, then a mean), since near-ties between
    layers would otherwise let rounding pick a different layer.
    """
    final_p = F.softmax(final_logits, dim=-1).unsqueeze(0)
    premature_p = F.softmax(premature_logits, dim=-1)
    midpoint = 0.5 * (final_p + premature_p)
    if form == "transformers":
        towards_final = F.kl_div(F.log_softmax(final_logits, dim=-1).unsqueeze(0), midpoint, reduction="none")
        towards_premature = F.kl_div(F.log_softmax(premature_logits, dim=-1), midpoint, reduction="none")
        return 0.5 * (towards_final.mean(-1) + towards_premature.mean(-1))
    # Where both distributions underflow to 0 the terms are 0 (0 * log 0); keep log(m) finite there.
    log_midpoint = torch.where(midpoint > 0, midpoint.log(), torch.zeros_like(midpoint))
    from_final = F.kl_div(log_midpoint, final_p.expand_as(midpoint), reduction="none").sum(-1)
    from_premature = F.kl_div(log_midpoint, premature_p, reduction="none").sum(-1)
    return 0.5 * (from_final + from_premature)


def dola_contrast(
    final_logits: torch.Tensor,
    premature_logits: torch.Tensor,
    layers: Sequence[int],
    *,
    relative_top: float = DEFAULT_RELATIVE_TOP,
    dola_form: str = "transformers",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoLa's next-token scores from final (B, V) and candidate premature (C, B, V) float32 logits.

    Returns ``(scores, chosen)``: scores (B, V), ``-inf`` outside the final layer's plausible set, and
    the premature layer (an entry of ``layers``) each row contrasted against. One layer skips the
    selection, as in 4.55.4.
    """
    if premature_logits.shape[0] == 1:
        pick = torch.zeros(final_logits.shape[0], dtype=torch.long, device=final_logits.device)
    else:
        pick = _layer_divergence(final_logits, premature_logits, dola_form).argmax(dim=0)
    rows = torch.arange(final_logits.shape[0], device=final_logits.device)
    final_logprobs = F.log_softmax(final_logits, dim=-1)
    premature_logprobs = F.log_softmax(premature_logits[pick, rows], dim=-1)
    threshold = final_logprobs.max(dim=-1, keepdim=True).values + math.log(relative_top)
    plausible = final_logprobs >= threshold
    scores = (final_logprobs - premature_logprobs).masked_fill(~plausible, -math.inf)
    chosen = torch.as_tensor(list(layers), device=final_logits.device)[pick]
    return scores, chosen


class _PrematureHead:
    """Turns premature hidden states (C, B, H) into float32 logits (C, B, V), in the chosen form."""

    def __init__(self, model: PreTrainedModel, form: str):
        self.model = model
        self.head = model.get_output_embeddings()
        if not isinstance(self.head, nn.Module):
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head); DoLa needs one")
        self.norm = None
        if form == "paper":
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
            self.norm = getattr(decoder, "norm", None)
            if not isinstance(self.norm, nn.Module):
                raise ValueError(
                    f"dola_form='paper' needs the final norm of {type(model).__name__}'s decoder (a `norm` module); "
                    "use dola_form='transformers'"
                )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return self.head(hidden).float()  # 4.55.4: the bare head, no norm, no soft-capping
        return head_logits(self.model, self.norm(hidden)).float()


def _positions(attention_mask: torch.Tensor | None, batch_size: int, length: int, device) -> torch.Tensor:
    """Position ids counting real tokens only, so left padding does not shift positions."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch_size, -1)
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def dola(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
    streamer=None,
    dola_layers: str | Sequence[int] | None = None,
    relative_top: float | None = None,
    dola_form: str | None = None,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """DoLa decoding loop, with the signature transformers expects of a ``custom_generate`` callable.

    ``model.generate(..., custom_generate=dola, dola_layers="high")`` prepares the inputs, logits
    processors (``repetition_penalty``, and the sampling warpers with ``do_sample=True``), stopping
    criteria and generation config, then calls this; ``dola_layers``, ``relative_top`` and
    ``dola_form`` reach it directly. ``dola_layers`` defaults to the generation config's, else
    ``"high"``. Returns the sequences (finished rows padded with ``pad_token_id``) or a
    ``GenerateDecoderOnlyOutput`` when ``return_dict_in_generate`` (``scores`` are the processed DoLa
    scores, ``logits`` the final layer's raw logits, as in 4.55.4).
    """
    if generation_config is None:
        generation_config = model.generation_config
    if model.config.is_encoder_decoder:
        raise ValueError("DoLa supports decoder-only models only")
    if synced_gpus:
        raise ValueError("cdlm's DoLa does not support synced_gpus")
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(f"DoLa does not combine with beam search (num_beams={generation_config.num_beams})")
    if dola_layers is None:
        dola_layers = getattr(generation_config, "dola_layers", None) or DEFAULT_DOLA_LAYERS
    relative_top, dola_form = validate_dola_params(
        DEFAULT_RELATIVE_TOP if relative_top is None else relative_top, dola_form or "transformers"
    )
    layers = candidate_layers(dola_layers, *depth_and_tying(model))
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("DoLa needs input_ids, not inputs_embeds")
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()

    attention_mask, cache, extra = split_model_kwargs(model_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config)
    elif cache.get_seq_length() != 0:
        raise ValueError("DoLa starts from an empty cache; a pre-filled past_key_values is not supported")
    premature_head = _PrematureHead(model, dola_form)
    return _dola_loop(
        model,
        input_ids,
        attention_mask,
        cache,
        layers,
        relative_top,
        dola_form,
        premature_head,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        extra,
    )


def _dola_loop(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    cache,
    layers: tuple[int, ...],
    relative_top: float,
    dola_form: str,
    premature_head: _PrematureHead,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer,
    extra: dict,
):
    device = input_ids.device
    batch_size, prompt_length = input_ids.shape
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    if has_eos_stopping_criteria and pad_token_id is None:
        raise ValueError("an EOS token is set but no pad_token_id: set generation_config.pad_token_id")
    do_sample = bool(generation_config.do_sample)
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    hidden_out = () if return_dict and generation_config.output_hidden_states else None
    attentions_out = () if return_dict and generation_config.output_attentions else None
    accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: let attention skip the mask, as generate() itself does
    position_ids = _positions(attention_mask, batch_size, prompt_length, device)
    step_ids = input_ids
    unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
    premature_layers = []  # (B,) per step: the layer each row contrasted against

    while True:
        outputs = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            output_attentions=attentions_out is not None,
            return_dict=True,
            **({"logits_to_keep": 1} if accepts_logits_to_keep else {}),
            **extra,
        )
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(
                f"{type(model).__name__} did not return hidden states; DoLa reads its premature layers from them"
            )
        final_logits = outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        premature_logits = premature_head(torch.stack([hidden_states[layer][:, -1, :] for layer in layers]))
        contrast, chosen = dola_contrast(
            final_logits, premature_logits, layers, relative_top=relative_top, dola_form=dola_form
        )
        premature_layers.append(chosen)
        processed = logits_processor(input_ids, contrast)
        if scores is not None:
            scores += (processed,)
        if raw_logits is not None:
            raw_logits += (final_logits,)
        if hidden_out is not None:
            hidden_out += (hidden_states,)
        if attentions_out is not None:
            attentions_out += (outputs.attentions,)
        del outputs, hidden_states

        if do_sample:
            next_tokens = torch.multinomial(nn.functional.softmax(processed, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = processed.argmax(dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
        step_ids = next_tokens[:, None]
        position_ids = position_ids[:, -1:] + 1
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1)

    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    output = GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=scores,
        logits=raw_logits,
        attentions=attentions_out,
        hidden_states=hidden_out,
        past_key_values=cache,
    )
    # Not a field of transformers' output class: which layer each row contrasted against, per step (B, steps).
    output.premature_layers = torch.stack(premature_layers, dim=1)
    return output


def dola_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dola_layers: str | Sequence[int] = DEFAULT_DOLA_LAYERS,
    relative_top: float = DEFAULT_RELATIVE_TOP,
    dola_form: str = "transformers",
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    max_new_tokens: int = 64,
    **generate_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Plain-function API: ``model.generate()`` with DoLa and explicit hyperparameters.

    Extra keyword arguments (``eos_token_id``, ``do_sample``, ``stopping_criteria``,
    ``return_dict_in_generate``, ...) go to ``generate()`` unchanged. ``stop_strings`` (with
    ``tokenizer``) become a ``StopStringCriteria`` here, since transformers 5 drops ``generate()``'s
    ``tokenizer`` argument whenever ``custom_generate`` is a callable.
    """
    validate_dola_params(relative_top, dola_form)
    parse_dola_layers(dola_layers)
    if (
        not isinstance(repetition_penalty, (int, float))
        or isinstance(repetition_penalty, bool)
        or repetition_penalty <= 0
    ):
        raise ValueError(f"repetition_penalty must be a number > 0, got {repetition_penalty!r}")
    stop_strings_as_criterion(generate_kwargs)
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        custom_generate=dola,
        dola_layers=dola_layers,
        relative_top=relative_top,
        dola_form=dola_form,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )


make_module_callable(__name__, dola)
