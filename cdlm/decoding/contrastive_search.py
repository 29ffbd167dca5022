"""Contrastive search (Su et al. 2022) as a ``custom_generate`` callable for transformers 5.

Contrastive search keeps the ``top_k`` most likely next tokens and picks the one maximising

    (1 - penalty_alpha) * p(v | x<t)  -  penalty_alpha * max_j cos(h_v, h_j)

where ``h_v`` is the last hidden state of candidate ``v`` and ``h_j`` those of every earlier token
(prompt included, padding excluded). transformers moved it out of core after 4.55; this module
reproduces 4.55.4's built-in implementation token for token (``tests/test_contrastive_search.py``
checks a recorded fixture) while doing less work per step:

* the ``k`` candidates of a row run as ``k`` query positions of that row, over one copy of its cache
  (``candidate_layout="shared_context"``): a 4-D mask lets candidate ``j`` see the row's past and itself
  only, all ``k`` at the same position, so each gets exactly the hidden state a one-token step would give
  it; afterwards only the winner's key/value entry is kept. The prompt's cache is read once per row and
  step, not ``k`` times (4.55.4 keeps ``B * k`` cache rows and repeats, then gathers, the whole cache every
  step, which is what makes long prompts slow). Models or caches
  where cdlm cannot build the masks itself (flash/flex attention, static or quantised caches, unknown layer
  types) run one cache row per candidate instead (``"row_per_candidate"``, 4.55.4's layout, where keeping
  the winner copies only its newest position); ``"auto"`` (the default) also checks on the first call for
  a model that one row's candidates come out the same both ways;
* only the transformer body runs on the candidates; the LM head (the ``vocab x hidden`` matmul, the
  biggest single matrix in small models) runs on the ``B`` winners only, since only their logits are
  needed for the next step;
* the context's hidden states are normalised once, when their token is chosen, into a buffer sized
  for the whole generation, instead of re-normalising (and repeating ``k`` times) the full context
  at every step.

Use it through ``generate()``::

    out = model.generate(input_ids, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4,
                         max_new_tokens=64)  # candidate_layout="auto" | "shared_context" | "row_per_candidate"

or call :func:`contrastive_search_generate`, which does the same with explicit arguments.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref

import torch
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from cdlm.decoding.custom_generate import make_module_callable, split_model_kwargs, stop_strings_as_criterion
from cdlm.decoding.methods import (  # re-exported: the registry class and its validation live with the registry
    DEFAULT_PENALTY_ALPHA,
    DEFAULT_TOP_K,
    ContrastiveSearchMethod,
    validate_contrastive_search_params,
)
from cdlm.models.lm_head import head_logits

CANDIDATE_LAYOUTS = ("auto", "shared_context", "row_per_candidate")
# ``auto`` keeps one cache row per candidate below this many cache entries (batch x context length) at the
# first step. Measured on SmolLM2-135M, 2-core CPU, k=4 (benchmarks/results/contrastive_search.md): batch 1 with
# 6-token prompts ran 1.12x faster per candidate row; batch 8 with 6-17-token prompts (136 entries) ran
# 1.37x faster with the shared context (median of 2 rounds on a heavily loaded machine).
SHARED_CONTEXT_MIN_CACHE_TOKENS = 64
# Cache layers whose newest position is the last one along dim -2 of ``keys``/``values``.
_LAST_POSITION_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)

logger = logging.getLogger(__name__)
# Models whose shared-context candidates were checked against one row per candidate, with what was checked
# ((attention implementation, fast path)); a model that fails the check is checked again on every call.
_SHARED_CONTEXT_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

__all__ = [
    "CANDIDATE_LAYOUTS",
    "ContrastiveSearchMethod",
    "contrastive_search",
    "contrastive_search_generate",
    "validate_contrastive_search_params",
]


class _Forward:
    """Runs the model on candidates and turns chosen hidden states into logits.

    The fast path calls the transformer body (``model.base_model``) and applies the LM head (and
    Gemma-style final logit soft-capping) itself, so the head runs on the winners only. It is used only
    after checking, on the prefill, that it reproduces the model's own logits; otherwise every call goes
    through the full model with ``output_hidden_states=True`` (slower, same tokens).
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.body = model.base_model if model.base_model is not model else None
        self.head = model.get_output_embeddings()
        self.fast = False
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, hidden)

    def prefill(self, input_ids, attention_mask, position_ids, cache, extra):
        """Last hidden states (B, T, H), float32 next-token logits (B, V) and every layer's hidden states."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            return_dict=True,
            **({"logits_to_keep": 1} if self.accepts_logits_to_keep else {}),
            **extra,
        )
        if getattr(outputs, "hidden_states", None) is None:
            raise ValueError(
                f"{type(self.model).__name__} did not return hidden states (output_hidden_states=True); "
                "contrastive search needs the last hidden state of every token"
            )
        hidden = outputs.hidden_states[-1]
        logits = outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        all_hidden = outputs.hidden_states
        if self.body is not None and isinstance(self.head, nn.Module):
            with torch.no_grad():
                check = self.head_logits(hidden[:, -1:, :])[:, -1, :].float()
            self.fast = check.shape == logits.shape and torch.allclose(check, logits, rtol=1e-4, atol=1e-4)
        return hidden, logits, all_hidden

    def candidates(self, token_ids, attention_mask, position_ids, cache):
        """Last hidden states (N, T, H) of ``T`` new tokens per row, their float32 logits (N, T, V) if computed,
        and (full path only) every layer's hidden states."""
        kwargs = dict(
            input_ids=token_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        if self.fast:
            return self.body(**kwargs, return_dict=True).last_hidden_state, None, None
        outputs = self.model(**kwargs, output_hidden_states=True, return_dict=True)
        if getattr(outputs, "hidden_states", None) is None:
            raise ValueError(
                f"{type(self.model).__name__} did not return hidden states; contrastive search needs them"
            )
        return outputs.hidden_states[-1], outputs.logits.float(), outputs.hidden_states


def _positions(attention_mask: torch.Tensor | None, batch_size: int, length: int, device) -> torch.Tensor:
    """Position ids as 4.55's ``prepare_inputs_for_generation`` builds them (left padding aware)."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch_size, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _keep_winners(cache, source_rows: torch.Tensor) -> None:
    """Make cache row ``i`` hold what row ``source_rows[i]`` holds (winner of its group of k rows).

    The k rows of a group are identical copies up to the last position: they all started from the
    same winner and only the candidate step appended different keys/values. So for plain dynamic
    layers copying the last position suffices; any other layer type gets the general batch gather.
    """
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if type(layer) in _LAST_POSITION_LAYERS and isinstance(keys, torch.Tensor) and keys.dim() == 4:
            layer.keys[:, :, -1] = layer.keys[source_rows, :, -1]
            layer.values[:, :, -1] = layer.values[source_rows, :, -1]
        else:
            layer.batch_select_indices(source_rows)
    if not hasattr(cache, "layers"):
        cache.batch_select_indices(source_rows)


class _RowPerCandidate:
    """4.55.4's layout: row ``b``'s ``k`` candidates are cache rows ``b*k .. b*k+k-1``, one query each.

    Works with any cache type, but every step reads ``k`` copies of each row's context (prompt included)
    and the cache holds ``B * k`` rows for the whole generation.
    """

    name = "row_per_candidate"

    def __init__(
        self, forward: _Forward, cache, attention_mask: torch.Tensor | None, batch_size: int, k: int, capacity: int
    ):
        self.forward, self.cache, self.batch_size, self.k = forward, cache, batch_size, k
        cache.batch_repeat_interleave(k)
        self.mask = None
        if attention_mask is not None:
            batch_size, prompt_length = attention_mask.shape
            self.mask = attention_mask.new_ones(batch_size * k, capacity)
            self.mask[:, :prompt_length] = attention_mask.repeat_interleave(k, dim=0)

    def step(self, top_ids: torch.Tensor, position: torch.Tensor, length: int):
        """Run the (B, k) candidates; hidden states (B*k, H), logits (B*k, V) or None, layers' (B*k, 1, H)."""
        mask = self.mask[:, : length + 1] if self.mask is not None else None
        positions = position.repeat_interleave(self.k, dim=0)
        hidden, logits, layers = self.forward.candidates(top_ids.reshape(-1, 1), mask, positions, self.cache)
        return hidden[:, -1], None if logits is None else logits[:, -1], layers

    def keep(self, selected: torch.Tensor) -> None:
        """Every candidate row of ``b`` now holds ``b``'s winner, ready for the next ``k`` candidates."""
        winners = torch.arange(len(selected), device=selected.device) * self.k + selected
        _keep_winners(self.cache, winners.repeat_interleave(self.k))

    def finish(self, return_cache: bool) -> None:
        """Leave one cache row per prompt when the cache is returned (``return_dict_in_generate``)."""
        if not return_cache:
            return
        rows = torch.arange(self.batch_size, device=self.mask.device if self.mask is not None else None) * self.k
        self.cache.batch_select_indices(rows)


class _SharedContext:
    """Row ``b``'s ``k`` candidates as ``k`` query positions of cache row ``b``: the context is read once.

    All ``k`` queries sit at the same position; a 4-D additive mask lets candidate ``j`` attend to the row's
    past (padding excluded) and to itself only, which is exactly what a one-token step would see, so each
    candidate's hidden state is the one it would get alone. The step appends the ``k`` candidates'
    keys/values; :meth:`keep` moves the winner's entry into the first of those slots and drops the rest.
    Sliding-window layers record past entries during the step (``record_past``) and are trimmed back to
    ``sliding_window - 1`` entries here, so their window ends up exactly where one-token decoding leaves it.
    """

    name = "shared_context"

    def __init__(self, forward: _Forward, cache, layout: tuple, padding: torch.Tensor, k: int):
        """``layout`` from :func:`_shared_context_layout`; ``padding`` (B, capacity) is 0 where a token may be
        attended to and the dtype's minimum at left padding."""
        self.forward, self.cache, self.k, self.padding = forward, cache, k, padding
        self.sliding, self.mask_keys = layout
        for layer, sliding in zip(cache.layers, self.sliding):
            if sliding:
                layer.record_past = True  # keep all k candidate entries until keep() trims the window
        blocked = torch.finfo(padding.dtype).min
        eye = torch.eye(k, dtype=torch.bool, device=padding.device)
        self.own_entry = torch.zeros(k, k, dtype=padding.dtype, device=padding.device).masked_fill(~eye, blocked)

    def _mask(self, stored: int, length: int) -> torch.Tensor:
        """(B, 1, k, stored + k) additive mask: the last ``stored`` context positions, then the k candidates."""
        batch_size, k = self.padding.shape[0], self.k
        past = self.padding[:, None, None, length - stored : length].expand(batch_size, 1, k, stored)
        return torch.cat([past, self.own_entry.expand(batch_size, 1, k, k)], dim=-1)

    def step(self, top_ids: torch.Tensor, position: torch.Tensor, length: int):
        """Same contract as :meth:`_RowPerCandidate.step`."""
        batch_size, k = top_ids.shape
        masks = {}
        for layer, sliding in zip(self.cache.layers, self.sliding):
            if sliding not in masks:
                masks[sliding] = self._mask(layer.keys.shape[-2], length)
        if self.mask_keys is None:
            attention_mask = next(iter(masks.values()))
        else:
            attention_mask = {name: masks[sliding] for name, sliding in self.mask_keys.items()}
        hidden, logits, layers = self.forward.candidates(
            top_ids, attention_mask, position.expand(batch_size, k), self.cache
        )
        hidden = hidden.reshape(batch_size * k, -1)
        if logits is not None:
            logits = logits.reshape(batch_size * k, -1)
        if layers is not None:
            layers = tuple(layer.reshape(batch_size * k, 1, -1) for layer in layers)
        return hidden, logits, layers

    def keep(self, selected: torch.Tensor) -> None:
        """Keep only the winner's key/value entry of the k just appended, in every layer."""
        rows = torch.arange(len(selected), device=selected.device)
        for layer, sliding in zip(self.cache.layers, self.sliding):
            stored = layer.keys.shape[-2] - self.k  # entries before this step's candidates
            source = stored + selected
            layer.keys[:, :, stored] = layer.keys[rows, :, source]
            layer.values[:, :, stored] = layer.values[rows, :, source]
            start = max(0, stored + 1 - (layer.sliding_window - 1)) if sliding else 0
            layer.keys = layer.keys[:, :, start : stored + 1]
            layer.values = layer.values[:, :, start : stored + 1]
            if sliding:
                layer.cumulative_length -= self.k - 1

    def finish(self, return_cache: bool) -> None:
        """Back to plain sliding-window behaviour (as generate() leaves a cache it returns)."""
        for layer, sliding in zip(self.cache.layers, self.sliding):
            if sliding:
                layer.record_past = False


def _shared_context_layout(model: PreTrainedModel, cache) -> tuple | None:
    """Whether the shared-context path applies: ``(sliding per cache layer, mask mapping keys or None)``.

    It needs masks it can build itself: an attention implementation that takes a 4-D additive mask as
    given (``eager``, ``sdpa``), plain dynamic cache layers (full, or sliding with one window), and layer
    types that say which mask each layer reads. A model mixing full and sliding layers gets a mapping
    ``{layer type: mask}``, as Gemma 3's forward accepts; otherwise the single 4-D mask is used as is.
    Anything else (static, quantised or offloaded caches, flash/flex attention, other layer types) returns
    None and runs the row-per-candidate path.
    """
    if getattr(model.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return None
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "offloading", False):
        return None
    sliding = []
    for layer in layers:
        if type(layer) not in _LAST_POSITION_LAYERS or not isinstance(getattr(layer, "keys", None), torch.Tensor):
            return None
        if layer.keys.dim() != 4:
            return None
        sliding.append(type(layer) is DynamicSlidingWindowLayer)
    if len({layer.sliding_window for layer, s in zip(layers, sliding) if s}) > 1:
        return None
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        has_window = getattr(config, "sliding_window", None) is not None
        return (sliding, None) if all(s == has_window for s in sliding) else None
    expected = {"full_attention": False, "sliding_attention": True}
    if len(layer_types) != len(layers) or any(expected.get(t) != s for t, s in zip(layer_types, sliding)):
        return None
    return (sliding, None) if len(set(sliding)) == 1 else (sliding, dict(zip(layer_types, sliding)))


def _cache_rows(cache, rows: torch.Tensor):
    """A cache holding copies of ``rows`` of ``cache`` (layer objects copied, tensors gathered); ``cache`` is
    left untouched."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    clone.batch_select_indices(rows)
    return clone


def _candidate_path(
    layout_name: str,
    forward: _Forward,
    cache,
    attention_mask: torch.Tensor | None,
    padding: torch.Tensor,
    top_ids: torch.Tensor,
    position: torch.Tensor,
    length: int,
    k: int,
    capacity: int,
):
    """The path that runs the candidates (see ``candidate_layout`` in :func:`contrastive_search`).

    ``auto`` takes the shared-context path when the cache holds at least ``SHARED_CONTEXT_MIN_CACHE_TOKENS``
    entries (batch x context; below that the mask and compaction cost more than the ``k``-fold cache reads
    they save), the model and cache allow it, and the first row's candidates
    come out the same both ways on the first step (a check of one row, ``2k`` extra query tokens, done once
    per model and attention implementation); otherwise it logs why and runs one cache row per candidate.
    """
    batch_size = top_ids.shape[0]
    layout = _shared_context_layout(forward.model, cache)
    too_small = batch_size * length < SHARED_CONTEXT_MIN_CACHE_TOKENS
    if layout_name == "row_per_candidate" or (layout_name == "auto" and (layout is None or too_small)):
        return _RowPerCandidate(forward, cache, attention_mask, batch_size, k, capacity)
    if layout is None:
        raise ValueError(
            "candidate_layout='shared_context' needs eager or sdpa attention and a plain dynamic cache "
            f"(full or sliding-window layers named by config.layer_types); {type(forward.model).__name__} "
            "does not qualify here: use candidate_layout='auto'"
        )
    checked_key = (getattr(forward.model.config, "_attn_implementation", None), forward.fast)
    if layout_name == "auto" and _SHARED_CONTEXT_CHECKED.get(forward.model) != checked_key:
        first = torch.zeros(1, dtype=torch.long, device=top_ids.device)
        probe = (top_ids[:1], position[:1], length)
        try:
            shared = _SharedContext(forward, _cache_rows(cache, first), layout, padding[:1], k).step(*probe)[0]
        except Exception as error:  # a model that builds its own masks may reject a prepared one
            logger.warning(
                "contrastive search: one cache row per candidate, since the shared-context layout failed "
                "on %s (%s: %s)",
                type(forward.model).__name__,
                type(error).__name__,
                error,
            )
            return _RowPerCandidate(forward, cache, attention_mask, batch_size, k, capacity)
        mask = None if attention_mask is None else attention_mask[:1]
        alone = _RowPerCandidate(forward, _cache_rows(cache, first), mask, 1, k, capacity).step(*probe)[0]
        tolerance = 1e-4 if shared.dtype in (torch.float32, torch.float64) else 2e-2
        if not torch.allclose(shared, alone, rtol=tolerance, atol=tolerance):
            logger.warning(
                "contrastive search: one cache row per candidate, since the shared-context layout changed "
                "%s's candidate hidden states (max difference %.3g)",
                type(forward.model).__name__,
                (shared - alone).abs().max().item(),
            )
            return _RowPerCandidate(forward, cache, attention_mask, batch_size, k, capacity)
        _SHARED_CONTEXT_CHECKED[forward.model] = checked_key
    return _SharedContext(forward, cache, layout, padding, k)


def contrastive_search(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
    streamer=None,
    penalty_alpha: float | None = None,
    top_k: int | None = None,
    candidate_layout: str = "auto",
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Contrastive search decoding loop, with the signature transformers expects of a ``custom_generate`` callable.

    ``model.generate(..., custom_generate=contrastive_search, penalty_alpha=A, top_k=K)`` prepares the
    inputs, logits processors, stopping criteria (``max_new_tokens``, EOS, custom criteria) and
    generation config, then calls this. Because ``penalty_alpha`` and ``top_k`` are parameters of this
    function, ``generate()`` hands them over directly (and does not warn that ``top_k`` is a sampling
    flag); when not given they come from a generation config that sets ``penalty_alpha``, else default
    to 0.6 and 4. ``candidate_layout`` picks how the candidates run (see the module docstring); the
    tokens are the same either way, ``auto`` is the fastest that applies.
    Returns the sequences (prompt + new tokens; finished rows padded with ``pad_token_id``) or a
    ``GenerateDecoderOnlyOutput`` when ``return_dict_in_generate``.

    transformers 5 drops ``generate()``'s ``tokenizer`` and ``streamer`` arguments for callables, so
    ``stop_strings`` fail there: use :func:`contrastive_search_generate` (which turns them into a
    ``StopStringCriteria``) or pass ``stopping_criteria=[StopStringCriteria(tokenizer, stops)]``.
    """
    if generation_config is None:
        generation_config = model.generation_config
    if model.config.is_encoder_decoder:
        raise ValueError("cdlm's contrastive search supports decoder-only models only")
    if synced_gpus:
        raise ValueError("contrastive search does not support synced_gpus")
    if generation_config.do_sample:
        raise ValueError("contrastive search is deterministic: pass do_sample=False (or leave it unset)")
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(
            f"contrastive search does not combine with beam search (num_beams={generation_config.num_beams})"
        )
    if generation_config.output_attentions:
        raise ValueError("contrastive search does not return attentions (output_attentions=True)")
    # generate() fills sampling defaults into the config (top_k=50), so the config's top_k only counts
    # when the config itself asks for contrastive search (its penalty_alpha is set).
    configured = generation_config.penalty_alpha is not None
    alpha = penalty_alpha if penalty_alpha is not None else generation_config.penalty_alpha
    if top_k is None and configured:
        top_k = generation_config.top_k
    alpha, top_k = validate_contrastive_search_params(
        DEFAULT_PENALTY_ALPHA if alpha is None else alpha, DEFAULT_TOP_K if top_k is None else top_k
    )
    if candidate_layout not in CANDIDATE_LAYOUTS:
        raise ValueError(f"candidate_layout must be one of {', '.join(CANDIDATE_LAYOUTS)}, got {candidate_layout!r}")
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    if "inputs_embeds" in model_kwargs and model_kwargs["inputs_embeds"] is not None:
        raise ValueError("contrastive search needs input_ids, not inputs_embeds")

    attention_mask, cache, extra = split_model_kwargs(model_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config)
    elif cache.get_seq_length() != 0:
        raise ValueError(
            "contrastive search starts from an empty cache; a pre-filled past_key_values is not supported"
        )

    return _contrastive_search_loop(
        model,
        input_ids,
        attention_mask,
        cache,
        alpha,
        top_k,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        extra,
        candidate_layout,
    )


def _contrastive_search_loop(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    cache,
    alpha: float,
    top_k: int,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer,
    extra: dict,
    candidate_layout: str,
):
    device = input_ids.device
    batch_size, prompt_length = input_ids.shape
    k = top_k
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    if has_eos_stopping_criteria and pad_token_id is None:
        raise ValueError("an EOS token is set but no pad_token_id: set generation_config.pad_token_id")
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    hidden_out = () if return_dict and generation_config.output_hidden_states else None
    max_length = getattr(stopping_criteria, "max_length", None) or generation_config.max_length or prompt_length + 1
    capacity = max(max_length, prompt_length + 1)

    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: let attention skip the mask, as generate() itself does
    position_ids = _positions(attention_mask, batch_size, prompt_length, device)
    forward = _Forward(model)

    hidden, logits, all_hidden = forward.prefill(input_ids, attention_mask, position_ids, cache, extra)
    if hidden_out is not None:
        # As in 4.55: step t reports the hidden states that produced its logits (the prompt's, then the
        # previous winner's), so there is one entry per generated token.
        forward.fast = False  # every layer's hidden states are wanted: run the full model on candidates

    # Normalised hidden states of every token so far, and which of them count (padding does not).
    hidden_size = hidden.shape[-1]
    context = torch.empty(batch_size, capacity, hidden_size, dtype=hidden.dtype, device=device)
    context[:, :prompt_length] = hidden / hidden.norm(dim=-1, keepdim=True)
    penalty_mask = torch.zeros(batch_size, capacity, dtype=hidden.dtype, device=device)
    if attention_mask is not None:
        penalty_mask[:, :prompt_length] = (1 - attention_mask.to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    del hidden
    length = prompt_length

    position = position_ids[:, -1:] + 1  # (B, 1): where this step's candidates sit
    rows = torch.arange(batch_size, device=device)
    row_offsets = rows * k
    unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
    path = None

    while True:
        processed = logits_processor(input_ids, logits)
        probs = nn.functional.softmax(processed, dim=-1)
        top_probs, top_ids = torch.topk(probs, dim=-1, k=k)
        if scores is not None:
            scores += (processed,)
        if hidden_out is not None:
            hidden_out += (all_hidden,)
        if raw_logits is not None:
            raw_logits += (logits,)

        if path is None:  # first step: the candidates are known, choose how to run them
            path = _candidate_path(
                candidate_layout, forward, cache, attention_mask, penalty_mask, top_ids, position, length, k, capacity
            )
        candidate_hidden, candidate_logits, candidate_layers = path.step(top_ids, position, length)

        # Degeneration penalty: max cosine similarity of each candidate with the context so far.
        normed = candidate_hidden / candidate_hidden.norm(dim=-1, keepdim=True)  # (B*k, H)
        normed = normed.view(batch_size, k, hidden_size)
        cosine = torch.matmul(context[:, :length], normed.transpose(1, 2))  # (B, L, k)
        cosine = cosine + penalty_mask[:, :length, None]
        penalty = cosine.max(dim=1).values  # (B, k)
        contrastive_score = (1.0 - alpha) * top_probs - alpha * penalty
        selected = contrastive_score.argmax(dim=-1)  # (B,): first maximum, as 4.55's max(dim=-1)
        winners = row_offsets + selected

        next_tokens = top_ids[rows, selected]
        context[:, length] = normed[rows, selected]
        if candidate_logits is not None:
            logits = candidate_logits[winners]
        else:
            logits = forward.head_logits(candidate_hidden[winners].unsqueeze(1))[:, -1, :].float()
        if hidden_out is not None:
            all_hidden = tuple(layer[winners] for layer in candidate_layers)
        length += 1
        path.keep(selected)
        position = position + 1

        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
        if length >= capacity:  # only without a max-length criterion; never silently overrun the buffers
            break

    path.finish(return_cache=return_dict)
    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    # Like 4.55: the cache holds the last chosen token too; drop it so the returned cache matches
    # sequences[:, :-1], as with the other decoding methods.
    try:
        cache.crop(-1)
    except RuntimeError:
        pass  # sliding-window layers past their window cannot be cropped; the cache stays one ahead
    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=scores,
        logits=raw_logits,
        attentions=None,
        hidden_states=hidden_out,
        past_key_values=cache,
    )


def contrastive_search_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    penalty_alpha: float = DEFAULT_PENALTY_ALPHA,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = 64,
    **generate_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Plain-function API: ``model.generate()`` with contrastive search and explicit hyperparameters.

    Extra keyword arguments (``eos_token_id``, ``logits_processor``, ``stopping_criteria``,
    ``return_dict_in_generate``, ...) go to ``generate()`` unchanged. ``stop_strings`` (with
    ``tokenizer``) become a ``StopStringCriteria`` here: transformers 5 drops the ``tokenizer``
    argument of ``generate()`` whenever ``custom_generate`` is a callable, so passing ``stop_strings``
    straight to ``generate()`` fails there.
    """
    penalty_alpha, top_k = validate_contrastive_search_params(penalty_alpha, top_k)
    stop_strings_as_criterion(generate_kwargs)
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        custom_generate=contrastive_search,
        penalty_alpha=penalty_alpha,
        top_k=top_k,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )


make_module_callable(__name__, contrastive_search)
