"""DistiLLM-2 losses (Ko et al., ICML 2025, arXiv 2503.07067) as pure functions.

Notation: ``p`` is the teacher's next-token distribution, ``q`` the student's, both over the full
(shared) vocabulary at every completion position.

* skew KL            SKL_a(p || q)  = KL(p || a p + (1 - a) q)        (used on teacher responses)
* skew reverse KL    SRKL_a(p || q) = KL(q || (1 - a) p + a q)        (used on student responses)

SKL pulls the student up wherever the teacher puts mass (it raises the likelihood of teacher
responses); SRKL pushes the student down wherever it puts more mass than the teacher (it lowers the
likelihood of the student's own responses). DistiLLM-2 combines them:

    L = (1 - beta) * SKL(y_teacher) + beta * SRKL(y_student),        CALD: beta = 1/2.

Mixtures are formed in log space (``logaddexp`` of the weighted log-probabilities), so they stay
finite where either distribution underflows. As in the official implementation, the student inside
the SRKL mixture is detached: the gradient flows only through the outer ``q`` (mass and log q), which
keeps SRKL a "push away from where I over-predict" signal instead of also moving the target.
The teacher never receives gradients.

The divergences are token-wise (one value per position); ``chunked_sequence_stats`` evaluates them
over the completion positions of a batch in chunks, from hidden states, so no more than
``(chunk, vocab)`` logits exist at a time (also in the backward pass, by recomputation).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from cdlm.models.lm_head import chunked

DIVERGENCES = ("skl", "srkl", "fkl", "rkl")


def _check_alpha(alpha: float | Tensor) -> None:
    if isinstance(alpha, Tensor):
        if alpha.numel() and not bool(((alpha > 0) & (alpha < 1)).all()):
            raise ValueError(f"alpha must lie in (0, 1); got values in [{alpha.min().item()}, {alpha.max().item()}]")
    elif not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (a=0 is plain KL, a=1 is zero), got {alpha}")


def _log_weights(alpha: float | Tensor, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """(log a, log(1 - a)), broadcastable against ``like[..., :1]`` for tensor alphas."""
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=like.device, dtype=like.dtype)
        while alpha.dim() < like.dim():
            alpha = alpha.unsqueeze(-1)
        return torch.log(alpha), torch.log1p(-alpha)
    return math.log(alpha), math.log1p(-alpha)


def _log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def skew_kl(teacher_logits: Tensor, student_logits: Tensor, alpha: float | Tensor = 0.1) -> Tensor:
    """Per-position SKL_a(p || q) = KL(p || a p + (1 - a) q), summed over the vocabulary.

    ``alpha`` is a float or a tensor broadcastable to the leading (position) dimensions, e.g. one
    value per sequence of shape (batch, 1) for (batch, seq, vocab) logits. Gradients reach the
    student only; as alpha -> 0 this tends to the forward KL(p || q).
    """
    _check_alpha(alpha)
    log_p = _log_softmax(teacher_logits).detach()
    log_q = _log_softmax(student_logits)
    log_a, log_1ma = _log_weights(alpha, log_p)
    log_mix = torch.logaddexp(log_p + log_a, log_q + log_1ma)
    return (log_p.exp() * (log_p - log_mix)).sum(-1)


def skew_reverse_kl(teacher_logits: Tensor, student_logits: Tensor, alpha: float | Tensor = 0.1) -> Tensor:
    """Per-position SRKL_a(p || q) = KL(q || (1 - a) p + a q), the student in the mixture detached.

    As alpha -> 0 this tends to the reverse KL(q || p).
    """
    _check_alpha(alpha)
    log_p = _log_softmax(teacher_logits).detach()
    log_q = _log_softmax(student_logits)
    log_a, log_1ma = _log_weights(alpha, log_p)
    log_mix = torch.logaddexp(log_p + log_1ma, log_q.detach() + log_a)
    return (log_q.exp() * (log_q - log_mix)).sum(-1)


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL(p || q): plain (word-level) knowledge distillation."""
    log_p = _log_softmax(teacher_logits).detach()
    log_q = _log_softmax(student_logits)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL(q || p)."""
    log_p = _log_softmax(teacher_logits).detach()
    log_q = _log_softmax(student_logits)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def token_divergence(name: str, teacher_logits: Tensor, student_logits: Tensor, alpha: float | Tensor = 0.1) -> Tensor:
    """Dispatch by name: ``skl``, ``srkl`` (skewed, use ``alpha``), ``fkl``, ``rkl``."""
    if name == "skl":
        return skew_kl(teacher_logits, student_logits, alpha)
    if name == "srkl":
        return skew_reverse_kl(teacher_logits, student_logits, alpha)
    if name == "fkl":
        return forward_kl(teacher_logits, student_logits)
    if name == "rkl":
        return reverse_kl(teacher_logits, student_logits)
    raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


def distillm2_objective(skl_teacher_responses: Tensor, srkl_student_responses: Tensor, beta: float) -> Tensor:
    """(1 - beta) * SKL on teacher responses + beta * SRKL on student responses (any matching shapes)."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return (1.0 - beta) * skl_teacher_responses + beta * srkl_student_responses


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def linear_beta(step: int, total_steps: int, beta0: float, increase: float, beta_max: float = 1.0) -> float:
    """beta0 + increase * step / total_steps, clipped to [beta0, beta_max] (beta_max <= 1).

    The official release's "gradual beta" (1 -> 1.5 over the first half of training in its
    (2 - b) SKL + b SRKL form) is beta0 = 0.5, increase = 0.5, beta_max = 0.75 here.
    """
    if not 0.0 <= beta0 <= 1.0:
        raise ValueError(f"beta0 must lie in [0, 1], got {beta0}")
    if not beta0 <= beta_max <= 1.0:
        raise ValueError(f"beta_max must lie in [beta0={beta0}, 1], got {beta_max}")
    if total_steps <= 0:
        return beta0
    value = beta0 + increase * (step / total_steps)
    return float(min(max(value, beta0), beta_max))


def likelihood_gap(first_mean_logp: Tensor, second_mean_logp: Tensor) -> Tensor:
    """exp(first) - exp(second): the gap between two per-token geometric-mean probabilities.

    On a teacher response, (teacher, student) gives how much likelier the teacher finds it; on a
    student response, (student, teacher) how much likelier the student finds its own output.
    """
    return first_mean_logp.exp() - second_mean_logp.exp()


def adaptive_alpha(gap: Tensor, anchor_gap: Tensor, alpha0: float = 0.1, alpha_min: float = 0.01) -> Tensor:
    """Per-sample skew of Algorithm 1 (curriculum-based adaptive alpha), clipped to [alpha_min, alpha0].

    Mixing a fraction ``alpha`` of the teacher into the student shrinks a sequence-likelihood gap
    ``d`` to ``(1 - alpha) d``. Algorithm 1 picks, per sample, the alpha for which that shrunk gap
    equals the sample's anchor ``(1 - alpha0) d_0`` (``d_0``: its gap under the initial student):

        alpha_i = clip(1 - (1 - alpha0) d_0,i / d_i, alpha_min, alpha0).

    At the start ``d_i = d_0,i`` gives alpha0; as the student closes the gap alpha falls towards
    alpha_min, so the target moves from the smoothed mixture towards the plain (harder) KL.
    A non-positive gap (student already at or past the teacher on this sample) keeps alpha0.
    """
    if not 0.0 < alpha_min <= alpha0 < 1.0:
        raise ValueError(f"need 0 < alpha_min <= alpha0 < 1, got alpha_min={alpha_min}, alpha0={alpha0}")
    gap = gap.float()
    anchor_gap = anchor_gap.to(gap)
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    raw = 1.0 - (1.0 - alpha0) * anchor_gap / safe
    raw = torch.where(gap > 0, raw, torch.full_like(gap, alpha0))
    return raw.clamp(alpha_min, alpha0)


# --------------------------------------------------------------------------------------------------
# Chunked evaluation from hidden states
# --------------------------------------------------------------------------------------------------

LogitsFn = Callable[[Tensor], Tensor]


def _chunk_stats(
    divergence: str | None,
    student_logits_fn: LogitsFn,
    teacher_logits_fn: LogitsFn,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    labels: Tensor,
    alpha: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    student_logits = student_logits_fn(student_hidden)
    with torch.no_grad():
        teacher_logits = teacher_logits_fn(teacher_hidden)
    student_logp = torch.log_softmax(student_logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    teacher_logp = torch.log_softmax(teacher_logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    if divergence is None:
        values = torch.zeros_like(student_logp)
    else:
        values = token_divergence(divergence, teacher_logits, student_logits, alpha)
    return values, student_logp, teacher_logp


def chunked_sequence_stats(
    *,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    labels: Tensor,
    seq_index: Tensor,
    num_sequences: int,
    student_logits_fn: LogitsFn,
    teacher_logits_fn: LogitsFn,
    divergence: str | None,
    alpha: float | Tensor = 0.1,
    chunk_size: int = 256,
    recompute: bool = True,
) -> dict[str, Tensor]:
    """Per-sequence sums of a token divergence and of both models' label log-probs, chunk by chunk.

    Args:
        student_hidden, teacher_hidden: (N, H_s) and (N, H_t) final hidden states at the N positions
            that predict a completion token (flattened over the batch).
        labels: (N,) the completion tokens those positions predict.
        seq_index: (N,) which sequence each position belongs to (0..num_sequences-1).
        student_logits_fn, teacher_logits_fn: hidden -> logits over the shared vocabulary.
        divergence: ``skl``, ``srkl``, ``fkl``, ``rkl`` or None (log-probs only).
        alpha: float, or (num_sequences,) per-sequence skew (Algorithm 1).
        recompute: with gradients enabled, recompute each chunk's logits in the backward pass
            (activation checkpointing) so the backward never holds more than one chunk of logits.

    Returns ``divergence``, ``student_logp``, ``teacher_logp`` (sums per sequence) and ``count``
    (completion tokens per sequence); the per-sequence means are the sums over ``count``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if divergence in ("skl", "srkl"):
        _check_alpha(alpha)
    device = student_hidden.device
    per_token_alpha = (
        alpha[seq_index].float()
        if isinstance(alpha, Tensor)
        else torch.full(seq_index.shape, float(alpha), device=device)
    )
    values, s_logp, t_logp = chunked(
        functools.partial(_chunk_stats, divergence, student_logits_fn, teacher_logits_fn),
        student_hidden,
        teacher_hidden,
        labels,
        per_token_alpha,
        chunk_size=chunk_size,
        recompute=recompute,
    )
    zeros = torch.zeros(num_sequences, device=device, dtype=torch.float32)
    sums = {
        "divergence": zeros.index_add(0, seq_index, values.float()),
        "student_logp": zeros.index_add(0, seq_index, s_logp.float()),
        "teacher_logp": zeros.index_add(0, seq_index, t_logp.float()),
    }
    count = torch.zeros(num_sequences, device=device).index_add(
        0, seq_index, torch.ones_like(seq_index, dtype=torch.float32)
    )
    return {**sums, "count": count}
