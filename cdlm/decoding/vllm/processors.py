"""CD and CID as one vLLM v1 batch-level logits processor (this module imports vLLM).

Register the class when building the engine (``LLM(..., logits_processors=[ContrastiveLogitsProcessor])``
or ``vllm serve ... --logits-processors cdlm.decoding.vllm.processors:ContrastiveLogitsProcessor``)
and switch it on per request with ``SamplingParams(extra_args=ContrastParams(...).to_extra_args())``
(over HTTP: the same flat ``cdlm_*`` keys in the body's ``vllm_xargs``). Requests without cdlm settings
pass through untouched. See ``cdlm.decoding.vllm`` for the design. Requests are checked against the
served model only where ``cdlm serve`` or ``load_vllm`` described it (``served.SERVED_ENV``); under a
plain ``vllm serve`` the engine-side guard still ends a request that fails, alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from cdlm.decoding.vllm.core import ContrastiveProcessorCore
from cdlm.decoding.vllm.early_exit import captured_layers

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class ContrastiveLogitsProcessor(LogitsProcessor):
    """Replaces each contrastive request's logits row with its contrastive scores.

    Not argmax-invariant (that is the point), so vLLM applies it before greedy and random sampling
    alike; vLLM's temperature/top-k/top-p then act on the contrastive scores.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # Runs in vLLM's API process at admission; a ValueError here reaches the caller (HTTP 400 on a server).
        ContrastiveProcessorCore.validate(sampling_params.extra_args, sampling_params.max_tokens)

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool) -> None:
        model_config = vllm_config.model_config
        dtype = getattr(model_config, "dtype", torch.float32)
        layers = captured_layers(model_config.hf_config)
        self.core = ContrastiveProcessorCore(
            str(model_config.model),
            device,
            dtype if isinstance(dtype, torch.dtype) else torch.float32,
            engine_early_exit=(vllm_config.instance_id, layers) if layers else None,
        )

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.core.update(batch_update.removed, batch_update.added, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.core.apply(logits)
