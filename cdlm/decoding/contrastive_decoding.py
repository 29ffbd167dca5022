"""Contrastive decoding (CD) as ``transformers`` logits processors: drop-in for ``model.generate()``.

CD prefers tokens the expert likes *more than* a weaker amateur does, restricted to tokens the
expert itself finds plausible. With expert log-probs ``lp_e`` and amateur log-probs ``lp_a``
(amateur logits divided by the temperature ``tau`` first), on the plausible set
``V_head = {v : p_e(v) >= alpha * max_w p_e(w)}`` (-inf elsewhere):

* ``formulation="li"`` (Li et al. 2022, arXiv 2210.15097, the default): ``lp_e(v) - lp_a(v)``; alpha = 0.1.
  It won cdlm's held-out open-ended comparison on SmolLM2 (``cdlm.decoding.contrast``).
* ``formulation="obrien-lewis"`` (O'Brien & Lewis 2023, arXiv 2309.09117):
  ``(1 + beta) * s_e(v) - beta * s_a(v)``; alpha = 0.1, beta = 0.5. The paper writes it on raw
  logits; we use log-probs, which differ by a per-row constant (same greedy choice, same sampling
  distribution) and give beam search comparable scores across beams. beta = 0 is plain greedy.

Two processors, one per kind of amateur:

* ``ContrastiveDecodingLogitsProcessor``: any separate amateur (own weights, device, dtype). It
  runs the amateur incrementally with its own KV cache and follows beam reorders (see
  ``cdlm.decoding.branch``).
* ``EarlyExitContrastiveLogitsProcessor``: the amateur is the expert's first N layers. A forward
  hook on layer N records its output during the expert's own forward pass, and the processor
  turns it into amateur logits with the expert's final norm and lm_head: no second forward, no
  second cache, and beam reorders need no handling (the hidden states already belong to the rows
  ``generate()`` just ran). A hook was chosen over a ``custom_generate`` callable because it keeps
  the processor a plain ``LogitsProcessor`` (works with every decoding mode, no reliance on
  ``generate()``'s private mode methods); its lifetime is managed by the processor: the hook is
  removed by ``close()``, on leaving a ``with`` block, or when the processor is garbage-collected.

``contrastive_decoding_processor(amateur, ...)`` picks the right one. Sampling warpers
(temperature, top-k, top-p) run after these processors in ``generate()``, i.e. on the contrast.
The contrast rule itself (formulations, defaults, validation) lives in ``cdlm.decoding.contrast``.

Example (tiny in-code models from ``cdlm.testing``; any causal LM pair with one vocabulary works):

>>> from transformers import LogitsProcessorList
>>> from cdlm import testing
>>> from cdlm.models import EarlyExitAmateur
>>> expert, amateur, tokenizer = testing.tiny_llama(seed=0), testing.tiny_llama(seed=1), testing.tiny_tokenizer()
>>> batch = tokenizer(["The quick brown fox", "Question: how"], return_tensors="pt", padding=True)
>>> cd = ContrastiveDecodingLogitsProcessor(amateur, beta=0.5, attention_mask=batch["attention_mask"], expert=expert)
>>> out = expert.generate(**batch, max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList([cd]))
>>> out.shape == (2, batch["input_ids"].shape[1] + 6)
True
>>> with EarlyExitContrastiveLogitsProcessor(EarlyExitAmateur(expert, 2), beta=1.0) as early_exit_cd:
...     out = expert.generate(**batch, max_new_tokens=6, do_sample=False,
...                           logits_processor=LogitsProcessorList([early_exit_cd]))
>>> early_exit_cd.attached  # the hook left the expert with the ``with`` block
False
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor, PreTrainedModel

from cdlm.decoding.branch import IncrementalBranch
from cdlm.decoding.contrast import (
    DEFAULT_ALPHA,
    DEFAULT_AMATEUR_TEMPERATURE,
    DEFAULT_BETA,
    DEFAULT_FORMULATION,
    ContrastSettings,
    plausible_mask,
)
from cdlm.decoding.methods import ContrastiveDecodingMethod  # noqa: F401  (the registry's ``cd``; lives there, light)
from cdlm.models.amateur import (
    EarlyExitAmateur,
    SeparateAmateur,
    check_bare_amateur,
)
from cdlm.models.prompts import check_left_padded


class _ContrastiveScoring:
    """Hyperparameters and the scoring rule shared by both CD processors.

    The processors keep per-generation state (a KV cache or a forward hook), so they declare
    ``supports_continuous_batching = False`` (transformers' ``LogitsProcessor`` convention).
    """

    supports_continuous_batching: bool | None = False

    def _init_scoring(
        self, alpha: float, beta: float, formulation: str, amateur_temperature: float, special_ids: Sequence[int]
    ) -> None:
        self.settings = ContrastSettings.for_cd(
            alpha=alpha, beta=beta, formulation=formulation, amateur_temperature=amateur_temperature
        ).forbidding_promotion_of(special_ids)
        self.alpha = self.settings.alpha
        self.beta = float(beta)
        self.formulation = self.settings.formulation
        self.amateur_temperature = self.settings.other_temperature

    def _contrast(self, scores: torch.Tensor, amateur_logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
        if vocab_size is not None:
            amateur_logits = amateur_logits[:, :vocab_size]
        return self.settings.apply(scores, amateur_logits)


class ContrastiveDecodingLogitsProcessor(_ContrastiveScoring, LogitsProcessor):
    """Contrastive decoding against a separate amateur model that keeps its own KV cache.

    Args:
        amateur: a ``SeparateAmateur`` (from ``make_separate_amateur``, which checks the
            tokenizers) or a bare causal LM that uses the expert's token ids. It may sit on another
            device or dtype than the expert; its logits are brought to the expert's device as float32.
            A bare model is checked (``check_bare_amateur``): its lm_head must score as many ids as
            the expert's (checked on the first step, or against ``expert``), unless ``vocab_size``
            says which common id range to contrast.
        alpha: plausibility threshold in (0, 1].
        beta: contrast strength for the O'Brien-Lewis form (>= 0; unused by the Li form).
        formulation: ``"li"`` (default) or ``"obrien-lewis"``.
        amateur_temperature: tau > 0 applied to the amateur's logits.
        special_ids: ids (EOS) the contrast may not promote past the expert's first choice
            (``ContrastSettings.special_ids``); empty (default): the papers' rule.
        attention_mask: the prompt's attention mask, as passed to ``generate()``. Recommended with
            padded batches; without it, leading ``pad_token_id`` tokens are treated as left padding.
            The mask belongs to that batch: reusing the processor on other prompts raises an error.
            A right-padded mask is refused (generation would continue from pad tokens).
        pad_token_id: defaults to the amateur's ``generation_config.pad_token_id``.
        vocab_size: contrast only ids below this (defaults to ``SeparateAmateur.vocab_size``, else
            the whole vocabulary, which a bare amateur must share with the expert); other ids get -inf.
        expert: the expert model, to check a bare amateur against it (vocabulary size, special
            tokens, tokenizer files) before decoding.

    Create one processor per ``generate()`` call. Without ``attention_mask``, reusing one on a new
    prompt restarts its cache.
    """

    def __init__(
        self,
        amateur: SeparateAmateur | PreTrainedModel,
        *,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        formulation: str = DEFAULT_FORMULATION,
        amateur_temperature: float = DEFAULT_AMATEUR_TEMPERATURE,
        special_ids: Sequence[int] = (),
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        expert: PreTrainedModel | None = None,
    ):
        self._init_scoring(alpha, beta, formulation, amateur_temperature, special_ids)
        if isinstance(amateur, EarlyExitAmateur):
            raise TypeError(
                "an EarlyExitAmateur needs no second model: use EarlyExitContrastiveLogitsProcessor "
                "(or contrastive_decoding_processor), or pass amateur.model to run it as a separate model"
            )
        model = amateur.model if isinstance(amateur, SeparateAmateur) else amateur
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"amateur must be a SeparateAmateur or a causal LM, got {type(amateur).__name__}")
        # A bare model whose vocabulary nobody vouched for is checked before its scores are trusted.
        self._unchecked_bare = not isinstance(amateur, SeparateAmateur) and vocab_size is None
        if self._unchecked_bare and expert is not None:
            check_bare_amateur(expert, model)
            self._unchecked_bare = False
        if vocab_size is None and isinstance(amateur, SeparateAmateur):
            vocab_size = amateur.vocab_size
        if pad_token_id is None:
            pad_token_id = model.generation_config.pad_token_id
        self.vocab_size = vocab_size
        self.branch = IncrementalBranch(model, pad_token_id=pad_token_id, prompt_attention_mask=attention_mask)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._unchecked_bare:
            check_bare_amateur(None, self.branch.model, expert_vocab_size=scores.shape[-1])
            self._unchecked_bare = False
        return self._contrast(scores, self.branch.next_logits(input_ids), self.vocab_size)


@dataclass
class _HiddenSlot:
    """What the forward hook writes: the last position of layer N's output and a forward counter.

    The hook closes over this slot, not over the processor, so the layer's hook table does not keep
    the processor alive (which would stop garbage collection from ever removing the hook).
    """

    last_hidden: torch.Tensor | None = None
    forwards: int = 0


def _decoder_layer(amateur: EarlyExitAmateur) -> torch.nn.Module:
    """Layer N of the expert: the shell's last layer is the very same module object."""
    return amateur.model.get_decoder().layers[amateur.exit_layer - 1]


class EarlyExitContrastiveLogitsProcessor(_ContrastiveScoring, LogitsProcessor):
    """Contrastive decoding whose amateur is the expert's first N layers, read off the expert's pass.

    Use with the expert the amateur was built from::

        amateur = EarlyExitAmateur(model, 8)
        with EarlyExitContrastiveLogitsProcessor(amateur) as cd:
            model.generate(**batch, logits_processor=LogitsProcessorList([cd]))

    (Without ``with``, the hook goes away when the processor is garbage-collected or ``close()``d.)
    The hook keeps only the newest layer-N output (last position, cloned), so a forgotten processor
    holds O(rows x hidden) memory, never a growing list. ``attention_mask`` (optional, the batch's) is
    only checked: a right-padded batch is refused, since generation would continue from pad tokens.
    """

    def __init__(
        self,
        amateur: EarlyExitAmateur,
        *,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        formulation: str = DEFAULT_FORMULATION,
        amateur_temperature: float = DEFAULT_AMATEUR_TEMPERATURE,
        special_ids: Sequence[int] = (),
        attention_mask: torch.Tensor | None = None,
    ):
        self._init_scoring(alpha, beta, formulation, amateur_temperature, special_ids)
        check_left_padded(attention_mask)  # only checked: the expert's own forward applies the mask
        if not isinstance(amateur, EarlyExitAmateur):
            raise TypeError(f"expected an EarlyExitAmateur, got {type(amateur).__name__}")
        self.amateur = amateur
        self.vocab_size = amateur.vocab_size
        self._slot = _HiddenSlot()
        self._consumed = 0
        slot = self._slot

        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            slot.last_hidden = hidden[:, -1, :].clone()
            slot.forwards += 1

        handle = _decoder_layer(amateur).register_forward_hook(hook)
        self._finalizer = weakref.finalize(self, handle.remove)

    @property
    def attached(self) -> bool:
        return self._finalizer.alive

    def close(self) -> None:
        """Remove the forward hook from the expert; the processor cannot be used afterwards."""
        self._finalizer()
        self._slot.last_hidden = None

    def __enter__(self) -> "EarlyExitContrastiveLogitsProcessor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        slot = self._slot
        if not self.attached:
            raise RuntimeError("this early-exit contrastive decoding processor was closed; create a new one")
        if slot.forwards == self._consumed or slot.last_hidden is None:
            raise RuntimeError(
                "no expert forward pass reached the early-exit layer since the last step: pass this processor "
                "to generate() of the expert model its EarlyExitAmateur was built from"
            )
        hidden = slot.last_hidden
        if hidden.shape[0] != scores.shape[0]:
            raise RuntimeError(
                f"the captured layer-{self.amateur.exit_layer} output has {hidden.shape[0]} rows but the scores have "
                f"{scores.shape[0]}: was another forward pass of the expert interleaved with generate()?"
            )
        self._consumed = slot.forwards
        slot.last_hidden = None
        with torch.no_grad():
            amateur_logits = self._amateur_logits(hidden, scores)
        return self._contrast(scores, amateur_logits, self.vocab_size)

    def _amateur_logits(self, hidden: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Amateur logits, computed only where they can matter.

        Tokens outside the expert's plausible set get -inf whatever the amateur says, and for greedy
        search and sampling a per-row constant in the amateur's scores cancels. So, when ``scores``
        are raw logits, only the lm_head rows of tokens plausible in some row are evaluated (the rest
        are filled with 0). Beam search hands processors log-probabilities (rows sum to 1), and there
        the amateur's per-row normaliser shifts beams against each other, so the full head is used.
        """
        vocab = min(self.vocab_size, scores.shape[-1])
        expert = scores[:, :vocab].float()
        if torch.allclose(expert.logsumexp(dim=-1), torch.zeros(()), atol=1e-4):
            return self.amateur.logits_from_hidden(hidden)
        candidates = plausible_mask(expert, self.alpha).any(dim=0).nonzero().squeeze(-1)
        partial = self.amateur.logits_from_hidden(hidden, candidates)
        full = torch.zeros(hidden.shape[0], vocab, dtype=partial.dtype, device=partial.device)
        return full.index_copy_(1, candidates, partial)


def contrastive_decoding_processor(
    amateur: EarlyExitAmateur | SeparateAmateur | PreTrainedModel,
    *,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    **hyperparameters: Any,
) -> ContrastiveDecodingLogitsProcessor | EarlyExitContrastiveLogitsProcessor:
    """The right CD processor for ``amateur`` (hook-based for early exit, cached second model otherwise)."""
    if isinstance(amateur, EarlyExitAmateur):
        return EarlyExitContrastiveLogitsProcessor(amateur, attention_mask=attention_mask, **hyperparameters)
    return ContrastiveDecodingLogitsProcessor(
        amateur, attention_mask=attention_mask, pad_token_id=pad_token_id, **hyperparameters
    )
