r"""Preference-optimisation objectives as pure tensor functions.

Every function takes already-computed (log-)probabilities and returns per-pair losses (shape ``(B,)``) or a
scalar; none runs a model. That keeps each objective checkable against an independent oracle (TRL's trainers,
a hand-written TDPO) and lets :class:`cdlm.alignment.PreferenceTrainer` and other trainers share them.

Notation: for a prompt :math:`x` with chosen reply :math:`y_w` and rejected reply :math:`y_l`,
:math:`\log\pi(y\mid x)=\sum_t \log\pi(y_t\mid x,y_{<t})` summed over completion tokens, and the sequence-level
implicit reward is :math:`r = \beta\,(\log\pi(y\mid x)-\log\pi_{\mathrm{ref}}(y\mid x))`.

Token-level tensors follow TRL's batch layout: shape ``(2B, T)`` with the ``B`` chosen rows first, then the
``B`` rejected rows, and ``T`` the *shifted* positions (position ``t`` scores token ``t+1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdlm.models.lm_head import LogitTransform, apply_head, chunked


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def chosen_nll(
    chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor, num_tokens: torch.Tensor | float | None = None
) -> torch.Tensor:
    r"""Token-mean negative log-likelihood of the chosen replies over the whole batch:
    :math:`-\sum_{i,t} m_{it}\log\pi(y^w_{it}) / \sum_{i,t} m_{it}` (CPO's behaviour-cloning term, as TRL's
    ``CPOTrainer`` computes it with ``CrossEntropyLoss`` over all chosen completion tokens).

    ``num_tokens`` replaces the denominator: under data parallelism, the global token count divided by the
    number of processes, so that DDP's gradient average gives the token mean of the global batch."""
    mask = chosen_mask.to(chosen_token_logps.dtype)
    denominator = (
        mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
    )
    return -(chosen_token_logps * mask).sum() / denominator.clamp(min=1)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    nll: torch.Tensor,
    beta: float,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""CPO (Xu et al., 2024), reference-free:
    :math:`\mathrm{mean}_i\,[-\log\sigma(\beta(\log\pi(y_w)-\log\pi(y_l)))] + \alpha\,\mathrm{NLL}(y_w)`.

    With ``label_smoothing`` :math:`\epsilon` the preference term is the conservative
    :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)`. ``nll`` comes from :func:`chosen_nll`.

    Returns:
        ``(loss, per_pair_preference_losses)``: the scalar training loss and the ``(B,)`` preference term.
    """
    _check_beta(beta)
    z = beta * (policy_chosen_logps - policy_rejected_logps)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return per_pair.mean() + alpha * nll, per_pair


@dataclass
class SparsePOOutput:
    """Result of :func:`sparsepo_loss`: ``loss`` is the scalar to minimise, the rest are per pair ``(B,)``."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_kl: torch.Tensor
    rejected_kl: torch.Tensor
    l1: torch.Tensor


def sparsepo_loss(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    token_kl: torch.Tensor,
    completion_mask: torch.Tensor,
    reward_mask: torch.Tensor,
    kl_mask: torch.Tensor,
    beta: float,
    mask_l1: float = 0.0,
    num_tokens: torch.Tensor | float | None = None,
) -> SparsePOOutput:
    r"""SparsePO (Christopoulou et al., 2024), token-level in the style of TDPO.

    For each completion token :math:`t` with reward mask :math:`m_u(t)` and KL mask :math:`m_d(t)`:

    .. math::
        U(y) = \sum_t m_u(t)\,(\log\pi - \log\pi_{\mathrm{ref}})(y_t), \qquad
        D(y) = \sum_t m_d(t)\,\mathrm{KL}(\pi_{\mathrm{ref}}(\cdot\mid x,y_{<t})\,\|\,\pi(\cdot\mid x,y_{<t}))

        \mathcal{L} = -\log\sigma\big(\beta\,[U(y_w) - U(y_l) + D(y_w) - D(y_l)]\big)
                      + \lambda_1 \cdot \mathrm{mean}_{t}\,(|m_u(t)| + |m_d(t)|)

    With :math:`m_u=m_d=1` this is exactly TDPO1 (Zeng et al., 2024): :math:`-\log\sigma(u-\delta)` with
    :math:`u=\beta\log\frac{\pi}{\pi_{\mathrm{ref}}}(y_w)-\beta\log\frac{\pi}{\pi_{\mathrm{ref}}}(y_l)` and
    :math:`\delta=\beta D_{\mathrm{SeqKL}}(y_l)-\beta D_{\mathrm{SeqKL}}(y_w)`. The L1 term (mean over completion
    tokens of both pairs' rows; counted once when the masks are the same tensor) drives learned masks to exact zeros.

    Args:
        policy_token_logps, ref_token_logps, token_kl, reward_mask, kl_mask: ``(2B, T)``, chosen rows first.
        completion_mask: ``(2B, T)`` 1 on completion tokens (positions already shifted).
        beta: > 0.
        mask_l1: weight :math:`\lambda_1` of the L1 penalty (0 disables it).
        num_tokens: replaces the L1 mean's token count (data parallelism: the global count over the number of
            processes, as in :func:`chosen_nll`).
    """
    _check_beta(beta)
    mask = completion_mask.to(policy_token_logps.dtype)
    reward_terms = (reward_mask * (policy_token_logps - ref_token_logps) * mask).sum(-1)
    kl_terms = (kl_mask * token_kl * mask).sum(-1)
    chosen_u, rejected_u = reward_terms.chunk(2)
    chosen_kl, rejected_kl = kl_terms.chunk(2)
    logits = beta * (chosen_u - rejected_u + chosen_kl - rejected_kl)
    losses = -F.logsigmoid(logits)
    n_tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
    n_tokens = n_tokens.clamp(min=1)
    l1 = (reward_mask.abs() * mask).sum() / n_tokens
    if kl_mask is not reward_mask:
        l1 = l1 + (kl_mask.abs() * mask).sum() / n_tokens
    loss = losses.mean() + (mask_l1 * l1 if mask_l1 else 0.0)
    return SparsePOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=beta * chosen_u.detach(),
        rejected_rewards=beta * rejected_u.detach(),
        chosen_kl=chosen_kl.detach(),
        rejected_kl=rejected_kl.detach(),
        l1=l1.detach(),
    )


def chunked_token_logps_and_kl(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    transform: LogitTransform | None = None,
    chunk_size: int = 256,
    checkpoint: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-token :math:`\log\pi(y_t)`, :math:`\log\pi_{\mathrm{ref}}(y_t)` and
    :math:`\mathrm{KL}(\pi_{\mathrm{ref}}\|\pi)`
    from final hidden states of the completion tokens only, ``chunk_size`` tokens at a time.

    SparsePO needs the full-vocabulary distributions of both models, but only at completion tokens and only one
    chunk at a time: with ``checkpoint=True`` the policy chunk's ``(chunk, vocab)`` logits are recomputed in the
    backward pass instead of being stored, so peak memory stays at about two ``(chunk, vocab)`` tensors rather than
    ``(batch, seq, vocab)``.

    Args:
        policy_hidden: ``(N, H)`` policy hidden states (with grad) at the N scored positions.
        ref_hidden: ``(N, H)`` reference hidden states (no grad).
        weight, bias: the LM head (``(V, H)``, ``(V,)`` or ``None``), shared when the reference is the
            adapter-disabled policy (LoRA never targets the head).
        labels: ``(N,)`` next-token ids.
        ref_weight, ref_bias: the reference's LM head when it is a separate model (default: ``weight``/``bias``).
        softcap: final logit soft-capping (Gemma 2/3 style) ``c * tanh(z / c)``, if the model uses it.
        logit_scale: multiplier applied to the logits before soft-capping.
        transform: the model's whole head transform (:meth:`cdlm.models.lm_head.LogitTransform.from_model`);
            replaces ``softcap`` and ``logit_scale``.
    """

    if ref_weight is None:
        ref_weight, ref_bias = weight, bias
    if transform is None:
        transform = LogitTransform(multiplier=logit_scale, softcap=softcap)

    def head(hidden: torch.Tensor, w: torch.Tensor = weight, b: torch.Tensor | None = bias) -> torch.Tensor:
        return apply_head(hidden, w, b, transform, float32=True)

    def ref_log_softmax(ref_chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(head(ref_chunk, ref_weight, ref_bias), dim=-1)

    def chunk_fn(policy_chunk: torch.Tensor, ref_chunk: torch.Tensor, label_chunk: torch.Tensor):
        # The reference log-softmax is recomputed here (not passed in) so that a checkpointed chunk stores only
        # (chunk, H) hidden states for the backward pass, never a (chunk, V) tensor.
        ref_logp = ref_log_softmax(ref_chunk)
        policy_logp = F.log_softmax(head(policy_chunk), dim=-1)
        kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)
        index = label_chunk[:, None]
        return policy_logp.gather(-1, index).squeeze(-1), ref_logp.gather(-1, index).squeeze(-1), kl

    policy_logps, ref_logps, kls = chunked(
        chunk_fn, policy_hidden, ref_hidden.detach(), labels, chunk_size=chunk_size, recompute=checkpoint
    )
    return policy_logps.float(), ref_logps.float(), kls.float()
