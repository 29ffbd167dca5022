"""A causal LM's output head applied by hand: lm_head, logit scaling and final soft-capping, in one place.

Decoding (the early-exit amateur, contrastive search), eval scoring and the alignment losses compute
logits from hidden states themselves (to score only some positions or vocabulary rows, or a chunk at a
time). They must then apply every step the model's own ``forward`` applies after its lm_head, or their
logits silently differ from the model's:

* a logit multiplier: Cohere-family models multiply by ``config.logit_scale``; Granite-family models
  divide by ``config.logits_scaling``; HyperCLOVA X multiplies by it;
* Gemma-style final soft-capping ``c * tanh(z / c)`` with ``c = config.final_logit_softcapping``.

:class:`LogitTransform` records both for a model; :func:`head_logits` is the whole head from final-norm
hidden states; :func:`chunked` runs any per-row function over row chunks (bounded ``(chunk, vocab)``
memory, optionally recomputed in the backward pass). ``tests/test_amateur.py`` checks ``head_logits``
against the models' own forward on Llama, Gemma3 (soft-capping), Cohere (``logit_scale``) and Granite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

# model_type -> (config attribute, whether forward multiplies (True) or divides (False) by it).
_LOGIT_MULTIPLIERS: dict[str, tuple[str, bool]] = {
    "cohere": ("logit_scale", True),
    "cohere2": ("logit_scale", True),
    "cohere2_moe": ("logit_scale", True),
    "cohere_compass": ("logit_scale", True),
    "granite": ("logits_scaling", False),
    "granite_swa": ("logits_scaling", False),
    "granitemoe": ("logits_scaling", False),
    "granitemoe_swa": ("logits_scaling", False),
    "granitemoeshared": ("logits_scaling", False),
    "granitemoehybrid": ("logits_scaling", False),
    "hyperclovax": ("logits_scaling", True),
}
# Attributes that scale logits in some architecture: on a model type not listed above, a value other
# than 1 means cdlm cannot know how its forward uses it, so it refuses rather than guess.
_SCALING_ATTRIBUTES = ("logit_scale", "logits_scaling")


def text_config(model: PreTrainedModel):
    """The config that describes the language model (the text config of a multimodal model)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def depth_and_tying(model: PreTrainedModel) -> tuple[int, bool]:
    """(number of decoder layers, tied input/output embeddings), as transformers 4.55.4's DoLa reads them."""
    config = text_config(model)
    tied = getattr(model.config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    return int(config.num_hidden_layers), bool(tied)


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to ``lm_head(hidden)``: ``logits * multiplier``, then soft-capping."""

    multiplier: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> "LogitTransform":
        config = text_config(model)
        model_type = getattr(config, "model_type", "")
        multiplier = 1.0
        if model_type in _LOGIT_MULTIPLIERS:
            attribute, multiplies = _LOGIT_MULTIPLIERS[model_type]
            value = getattr(config, attribute, None)
            if value is not None:
                multiplier = float(value) if multiplies else 1.0 / float(value)
        else:
            for attribute in _SCALING_ATTRIBUTES:
                value = getattr(config, attribute, None)
                if value is not None and float(value) != 1.0:
                    raise ValueError(
                        f"{type(model).__name__} (model_type {model_type!r}) sets {attribute}={value}, and cdlm does "
                        "not know whether its forward multiplies or divides the logits by it; add the model type "
                        "to cdlm.models.lm_head._LOGIT_MULTIPLIERS"
                    )
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(multiplier, float(softcap) if softcap else None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def apply_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    *,
    float32: bool = False,
) -> torch.Tensor:
    """``transform(hidden @ weight.T + bias)``; with ``float32`` the scaling runs on float32 logits."""
    logits = F.linear(hidden, weight, bias)
    return transform(logits.float() if float32 else logits)


def head_logits(
    model: PreTrainedModel, normed_hidden: torch.Tensor, token_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``model``'s output logits from final-norm hidden states, exactly as its forward computes them.

    With ``token_ids`` (1-D), only those vocabulary rows of the lm_head are used and the last
    dimension follows ``token_ids``. Callers that already know which positions (or tokens) they need
    skip most of the head's cost, which is a large share of a small model's forward.
    """
    head = model.get_output_embeddings()
    transform = LogitTransform.from_model(model)
    if token_ids is None:
        return transform(head(normed_hidden))
    bias = None if head.bias is None else head.bias[token_ids]
    return apply_head(normed_hidden, head.weight[token_ids], bias, transform)


def chunked(
    function: Callable[..., tuple[torch.Tensor, ...]],
    *rows: torch.Tensor,
    chunk_size: int,
    recompute: bool = True,
) -> tuple[torch.Tensor, ...]:
    """``function`` over consecutive ``chunk_size``-row slices of ``rows``, outputs concatenated along dim 0.

    ``function`` takes one slice of each tensor in ``rows`` and returns a tuple of per-row tensors.
    Only one chunk's intermediates (e.g. its ``(chunk, vocab)`` logits) exist at a time; with
    ``recompute`` and gradients flowing, each chunk is recomputed in the backward pass (activation
    checkpointing) so the backward pass holds no more than one chunk's logits either.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    total = rows[0].shape[0]
    if any(tensor.shape[0] != total for tensor in rows):
        raise ValueError(f"chunked() needs tensors with the same number of rows, got {[t.shape[0] for t in rows]}")
    if total == 0:
        return tuple(function(*rows))
    use_checkpoint = recompute and torch.is_grad_enabled() and any(t.requires_grad for t in rows)
    pieces: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, total, chunk_size):
        args = tuple(tensor[start : start + chunk_size] for tensor in rows)
        if use_checkpoint:
            pieces.append(tuple(torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)))
        else:
            pieces.append(tuple(function(*args)))
    return tuple(torch.cat(parts) for parts in zip(*pieces))
