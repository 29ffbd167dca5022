"""SparsePO token masks: derived from reference-model activations, or learned alongside the policy.

SparsePO (Christopoulou et al., 2024) weights each completion token's reward term and KL term with masks
``m_u`` and ``m_d`` in ``[0, inf)``. Two ways to get them, both computed from the *reference* model so that the
masks do not chase the policy they weight:

* :func:`activation_token_mask` (``mask_type="activation"``): the mean over features of hooked activations
  (MLP outputs, attention outputs, residual stream, or logits) of chosen layers, z-normalised per sequence over its
  completion tokens (so layers with different scales can be averaged), averaged over layers, then min-max rescaled
  to ``[0, 1]`` per sequence. Detached and shared by the reward and KL terms.
* :class:`SparseTokenMasks` (``mask_type="learned"``): per layer ``LayerNorm -> Linear(H, 1) -> ReLU`` heads on the
  reference hidden states, mixed across layers by ``Linear(L, 1) -> ReLU``. The ReLUs give exact zeros, i.e. real
  sparsity, pushed further by an L1 penalty. One mask shared by both terms, or two independent ones.

All masks are aligned with TRL's *shifted* positions: the mask at position ``t`` weights the term for token
``t + 1``, computed from the reference model's state at ``t`` (the state that predicts that token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

ACTIVATION_SOURCES = ("mlp", "attn", "residual", "logits")


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a transformers backbone (``model.layers`` for Llama, Gemma3, Qwen, Mistral...)."""
    layers = getattr(backbone, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    num_layers = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(backbone).__name__} to hook SparsePO activations")


def resolve_layers(spec: Sequence[int] | None, num_layers: int) -> list[int]:
    """Layer indices (negative ones count from the end); ``None`` means all layers."""
    if spec is None or len(spec) == 0:
        return list(range(num_layers))
    resolved = []
    for index in spec:
        position = index + num_layers if index < 0 else index
        if not 0 <= position < num_layers:
            raise ValueError(f"SparsePO mask layer {index} is out of range for a model with {num_layers} layers")
        resolved.append(position)
    return resolved


@contextlib.contextmanager
def capture_activations(backbone: nn.Module, source: str, layers: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Forward hooks that collect, per forward pass, the MLP or attention outputs of ``layers``.

    Yields a list filled (in layer order) on each forward of ``backbone``. ``residual`` and ``logits`` need no hooks
    (they come from ``output_hidden_states``), so for them the list stays empty.
    """
    captured: list[torch.Tensor] = []
    handles = []
    if source in ("mlp", "attn"):
        modules = decoder_layers(backbone)
        for index in layers:
            layer = modules[index]
            target = getattr(layer, "mlp" if source == "mlp" else "self_attn", None)
            if target is None:
                raise ValueError(
                    f"decoder layer {index} of {type(backbone).__name__} has no "
                    f"{'mlp' if source == 'mlp' else 'self_attn'} module"
                )

            def hook(_module, _inputs, output):
                captured.append((output[0] if isinstance(output, tuple) else output).detach())

            handles.append(target.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _masked_zscore(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (values * mask).sum(-1, keepdim=True) / count
    var = (((values - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return (values - mean) / (var.sqrt() + eps)


@torch.no_grad()
def activation_token_mask(
    per_layer_activations: Sequence[torch.Tensor], completion_mask: torch.Tensor
) -> torch.Tensor:
    """Activation-derived SparsePO mask in ``[0, 1]``, zero outside the completion.

    Args:
        per_layer_activations: one ``(B, T, F)`` (or already feature-averaged ``(B, T)``) tensor per layer, aligned
            with ``completion_mask``.
        completion_mask: ``(B, T)`` 1 on completion positions.

    Steps: mean over features -> z-score per sequence over completion positions -> mean over layers -> min-max to
    ``[0, 1]`` per sequence over completion positions (a sequence with a single or constant token gets 1).
    """
    if not per_layer_activations:
        raise ValueError("activation_token_mask needs at least one layer's activations")
    mask = completion_mask.to(torch.float32)
    scores = []
    for activation in per_layer_activations:
        per_token = activation.float().mean(-1) if activation.dim() == 3 else activation.float()
        scores.append(_masked_zscore(per_token, mask))
    score = torch.stack(scores).mean(0)
    big = torch.finfo(score.dtype).max
    low = score.masked_fill(mask == 0, big).amin(-1, keepdim=True)
    high = score.masked_fill(mask == 0, -big).amax(-1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 1e-6, (score - low) / span.clamp(min=1e-6), torch.ones_like(score))
    return (scaled * mask).detach()


class _LayerHeads(nn.Module):
    """One mask: a ``LayerNorm -> Linear(H, 1) -> ReLU`` head per layer, mixed by ``Linear(L, 1) -> ReLU``."""

    def __init__(self, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 1), nn.ReLU()) for _ in range(num_layers)
        )
        self.mix = nn.Linear(num_layers, 1)
        # Start at m == 1 everywhere, i.e. at TDPO1: small random head weights, unit head bias, averaging mix.
        for head in self.heads:
            nn.init.normal_(head[1].weight, std=1e-3)
            nn.init.ones_(head[1].bias)
        nn.init.constant_(self.mix.weight, 1.0 / num_layers)
        nn.init.zeros_(self.mix.bias)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        per_layer = torch.cat([head(h) for head, h in zip(self.heads, hidden_states, strict=True)], dim=-1)
        return torch.relu(self.mix(per_layer)).squeeze(-1)


class SparseTokenMasks(nn.Module):
    """Learned SparsePO masks over reference hidden states.

    Args:
        hidden_size: the model's hidden size.
        layers: indices into ``output_hidden_states`` (0 = embeddings, ``num_layers`` = last layer output) whose
            states feed the heads.
        shared: one mask for both terms (``m_u = m_d``) or two independent masks.

    ``forward(hidden_states)`` takes the full ``output_hidden_states`` tuple (detached) and returns
    ``(reward_mask, kl_mask)``, each ``(B, T)``; with ``shared=True`` they are the same tensor.
    """

    def __init__(self, hidden_size: int, layers: Sequence[int], shared: bool = True) -> None:
        super().__init__()
        self.layers = list(layers)
        self.shared = shared
        self.reward = _LayerHeads(hidden_size, len(self.layers))
        self.kl = None if shared else _LayerHeads(hidden_size, len(self.layers))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        selected = [hidden_states[index].detach() for index in self.layers]
        reward_mask = self.reward(selected)
        kl_mask = reward_mask if self.kl is None else self.kl(selected)
        return reward_mask, kl_mask

    def extra_repr(self) -> str:
        return f"layers={self.layers}, shared={self.shared}"


def mask_sparsity(mask: torch.Tensor, completion_mask: torch.Tensor) -> float:
    """Fraction of completion tokens whose mask is exactly zero."""
    keep = completion_mask.bool()
    total = int(keep.sum())
    return float(((mask == 0) & keep).sum()) / total if total else 0.0
