r"""Reference formulas written from the papers, used only as oracles by the tests (the library runs TRL's own
losses for these objectives, so they have no home under ``cdlm/``).

Notation: :math:`r = \beta(\log\pi(y\mid x) - \log\pi_{\mathrm{ref}}(y\mid x))` for the chosen (:math:`w`) and
rejected (:math:`l`) replies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_sigmoid_loss(policy_w, policy_l, ref_w, ref_l, beta: float) -> torch.Tensor:
    r"""DPO (Rafailov et al., 2023), per pair: :math:`-\log\sigma(r_w - r_l)`."""
    return -F.logsigmoid(beta * ((policy_w - ref_w) - (policy_l - ref_l)))


def apo_zero_loss(policy_w, policy_l, ref_w, ref_l, beta: float) -> torch.Tensor:
    r"""APO-zero (D'Oosterlinck et al., 2024, eq. 7): :math:`(1-\sigma(r_w)) + \sigma(r_l)` (TRL's +1 offset)."""
    return (1 - torch.sigmoid(beta * (policy_w - ref_w))) + torch.sigmoid(beta * (policy_l - ref_l))


def apo_down_loss(policy_w, policy_l, ref_w, ref_l, beta: float) -> torch.Tensor:
    r"""APO-down (eq. 8): :math:`\sigma(r_w) + (1 - \sigma(r_w - r_l))` (TRL's +1 offset)."""
    r_w, r_l = beta * (policy_w - ref_w), beta * (policy_l - ref_l)
    return torch.sigmoid(r_w) + (1 - torch.sigmoid(r_w - r_l))


def token_kl_from_logits(ref_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    r"""Per position :math:`\sum_v p_{\mathrm{ref}}(v)(\log p_{\mathrm{ref}}(v) - \log p(v))` from full logits."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - F.log_softmax(policy_logits.float(), dim=-1))).sum(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO (TRL 1.16): ``(r - group mean) / (unbiased group std + 1e-4)``; ``"none"`` skips the scaling."""
    grouped = rewards.reshape(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return advantages
    return advantages / (grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) + 1e-4)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (TRL 1.16): ``r_i - mean_{j != i} r_j`` within each prompt's group."""
    grouped = rewards.reshape(-1, group_size)
    return (grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)).reshape(-1)
