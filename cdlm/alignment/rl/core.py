"""Pure tensor functions behind the PPO trainer: KL penalty, per-token rewards, GAE, clipped losses.

They are kept free of models and optimisers so that each can be checked against a hand-computed
example or a direct formula (see ``tests/test_ppo_core.py``). Shapes follow the RLHF convention:
``(batch, response_length)`` tensors with a 0/1 ``mask`` marking real response tokens (the tokens
up to and including the first EOS); everything at masked positions is ignored.

The group advantages of GRPO and RLOO are here too, written to match the formulas in TRL 1.16's
``GRPOTrainer._generate_and_score_completions`` (group mean, optional group std scaling with
``+1e-4``) and ``RLOOTrainer`` (leave-one-out mean), because TRL does not expose them as functions.
They exist to show (and test) that a per-prompt constant baseline cancels in both.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k3", "abs", "mse")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (all positions count equally)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions; Bessel-corrected by default, like ``torch.var``."""
    mean = masked_mean(values, mask)
    centred = values - mean
    variance = masked_mean(centred**2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("masked_var needs at least two unmasked values for an unbiased variance")
        variance = variance * count / (count - 1)
    return variance


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to zero mean / unit variance over the masked positions; masked positions become 0.

    With ``shift_mean=False`` only the scale changes (used for rewards, whose sign carries meaning).
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of the *sampled* tokens.

    ``k1`` is ``log p - log q`` (unbiased, can be negative per token), ``k3`` is
    ``exp(log q - log p) - 1 - (log q - log p)`` (unbiased and always >= 0), ``abs`` and ``mse``
    are the ``|log p - log q|`` and ``0.5 (log p - log q)^2`` variants. Positive means the policy
    puts more mass on the sampled token than the reference does.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio**2
    return torch.expm1(-log_ratio) + log_ratio


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last unmasked token of each row (0 for an all-masked row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """RLHF reward shaping: ``-kl_coef * kl`` at every response token, plus the sequence score on its last token.

    ``scores`` has shape ``(batch,)``; the result is 0 on masked positions.
    """
    if scores.dim() != 1 or scores.shape[0] != kl.shape[0]:
        raise ValueError(f"scores must have shape (batch,) = ({kl.shape[0]},), got {tuple(scores.shape)}")
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last_token_index(mask)] += scores.to(kl.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, ``A_t = sum_l (gamma*lam)^l delta_{t+l}``,
    ``delta_t = r_t + gamma V_{t+1} - V_t``.

    Values and rewards at masked positions are treated as 0, so the episode ends at the last
    response token (``V_{T} = 0``: there is no bootstrap after EOS). Returns ``(advantages, returns)``
    with ``returns = advantages + values``, both 0 on masked positions.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)} must match"
        )
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    length = rewards.shape[1]
    advantages_reversed = []
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages_reversed.append(last)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask_f
    returns = (advantages + values) * mask_f
    return advantages, returns


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` with ``r = exp(logp - logp_old)``.

    Returns the loss and statistics: ``clipfrac`` (fraction of tokens where the clipped branch is
    active) and ``approx_kl`` (``0.5 * mean((logp - logp_old)^2)``, Schulman's low-variance estimator).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``.

    The critic may not move further than ``c`` from its old prediction."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    clipped_losses = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, clipped_losses), mask)
    return loss, {"vf_clipfrac": masked_mean((clipped_losses > losses).float(), mask).detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, ``logsumexp(z) - sum softmax(z) z``."""
    probabilities = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probabilities * logits).sum(dim=-1)
