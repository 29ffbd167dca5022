"""The scoring rules shared by contrastive decoding and contrastive input decoding.

Both methods score a token only if the expert finds it *plausible*, then subtract (a multiple of) a
second distribution's log-probability from the expert's. Keeping the formulas in one place makes
the processors thin and lets tests check the maths against an independent reference.

Everything here works on ``(rows, vocab)`` float32 tensors and allocates O(rows x vocab) memory.
"""

from __future__ import annotations

import math

import torch

FORMULATIONS = ("li", "obrien-lewis")


def check_alpha(alpha: float) -> float:
    """The plausibility threshold alpha keeps tokens with p >= alpha * max p; it must be in (0, 1]."""
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha (plausibility threshold) must be in (0, 1], got {alpha}")
    return alpha


def check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_formulation(formulation: str) -> str:
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown contrastive decoding formulation {formulation!r}; choose one of {FORMULATIONS}")
    return formulation


def plausible_mask(expert_log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """V_head: tokens with p_exp(v) >= alpha * max_w p_exp(w), i.e. log p >= log(alpha) + max log p.

    On logits this is the same set as O'Brien & Lewis's ``logit >= log(alpha) + max logit``, because
    log-softmax only shifts a row by a constant. The argmax token is always in the set.
    """
    cutoff = expert_log_probs.max(dim=-1, keepdim=True).values + math.log(alpha)
    return expert_log_probs >= cutoff


def contrast(
    expert_scores: torch.Tensor,
    other_logits: torch.Tensor,
    *,
    alpha: float,
    weight: float,
    formulation: str,
    other_temperature: float = 1.0,
) -> torch.Tensor:
    """Contrastive scores, shaped like ``expert_scores``; -inf outside the plausible set.

    Args:
        expert_scores: (rows, V_e) expert logits or log-probs (generate() passes log-probs under
            beam search and logits otherwise; both give the same result, see below).
        other_logits: (rows, V_o) logits of the amateur (CD) or of the contrastive input (CID).
        weight: beta for the O'Brien-Lewis form, lambda for the Li form / contrastive input decoding.
        formulation: ``"li"``: ``log p_exp - weight * log p_other`` (Li et al. 2022 use weight 1);
            ``"obrien-lewis"``: ``(1 + weight) * log p_exp - weight * log p_other``.
        other_temperature: tau; ``p_other`` is ``softmax(other_logits / tau)``.

    Both distributions are log-softmax normalised before contrasting. O'Brien & Lewis write their
    rule on raw logits; per row that differs from ours only by a constant, so greedy choices and
    sampling probabilities are identical, while beam search (which sums scores *across* rows) gets
    a well-defined per-token score instead of one shifted by each row's arbitrary logit offset.

    Only ids both sides score (``min(V_e, V_o)``) are contrasted; larger expert ids get -inf. The
    plausible set is taken over that common range, so every row keeps at least one finite score.
    """
    vocab = min(expert_scores.shape[-1], other_logits.shape[-1])
    expert_lp = torch.log_softmax(expert_scores[:, :vocab].float(), dim=-1)
    other = other_logits[:, :vocab].to(device=expert_scores.device, dtype=torch.float32)
    if other_temperature != 1.0:
        other = other / other_temperature
    other_lp = torch.log_softmax(other, dim=-1)
    if weight == 0.0:  # also avoids 0 * -inf = nan where the other side rules a token out
        scores = expert_lp.clone()
    elif formulation == "li":
        scores = expert_lp - weight * other_lp if weight != 1.0 else expert_lp - other_lp
    else:
        scores = (1.0 + weight) * expert_lp - weight * other_lp
    keep = plausible_mask(expert_lp, alpha)
    out = torch.full_like(expert_scores, -math.inf, dtype=torch.float32)
    out[:, :vocab] = scores.masked_fill_(~keep, -math.inf)
    return out.to(expert_scores.dtype)
