"""The contrastive processor's logic, independent of vLLM's classes (so it is testable without vLLM).

``ContrastiveProcessorCore`` is what ``ContrastiveLogitsProcessor`` delegates to: it turns vLLM's
batch updates into per-request ``RequestState``s and rewrites the logits rows of contrastive
requests. A fake engine loop can drive it exactly as vLLM's sampler does (see
``tests/test_vllm_state.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from cdlm.decoding._contrast import contrast
from cdlm.decoding.vllm.amateurs import get_amateur
from cdlm.decoding.vllm.params import ContrastParams
from cdlm.decoding.vllm.state import HFAmateur, RequestState, RequestTable

AmateurResolver = Callable[[str, str, torch.device, torch.dtype], HFAmateur]


class ContrastiveProcessorCore:
    """Per-request amateur state plus the row rewrite, for one engine.

    Args:
        expert_source: the folder (or hub id) the engine serves; ``"self"`` and ``"early-exit:N"``
            amateurs are transformers copies loaded from it.
        device: where amateurs run and their logits go.
        dtype: amateur dtype (the engine's).
        resolve_amateur: spec -> ``HFAmateur`` (defaults to ``cdlm.decoding.vllm.amateurs.get_amateur``).
    """

    def __init__(
        self,
        expert_source: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolve_amateur: AmateurResolver = get_amateur,
    ) -> None:
        self.expert_source = expert_source
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolve_amateur = resolve_amateur
        self.table = RequestTable()

    @staticmethod
    def validate(extra_args: dict | None) -> ContrastParams | None:
        return ContrastParams.from_extra_args(extra_args)

    def new_state(self, params: Any, prompt_ids: Sequence[int] | None, output_ids: list[int]) -> RequestState | None:
        settings = ContrastParams.from_extra_args(getattr(params, "extra_args", None))
        if settings is None:
            return None
        if settings.method == "cid":
            prefix = list(settings.contrastive_prompt_token_ids)
        else:
            if prompt_ids is None:
                raise ValueError("contrastive decoding needs the prompt's token ids (prompt embeddings are not supported)")
            prefix = list(prompt_ids)
        amateur = self.resolve_amateur(settings.amateur, self.expert_source, self.device, self.dtype)
        return RequestState(settings, prefix, output_ids, amateur)

    def update(
        self,
        removed: Iterable[int],
        added: Iterable[tuple[int, Any, Sequence[int] | None, list[int]]],
        moved: Iterable[tuple[int, int, Any]],
    ) -> None:
        self.table.update(removed, added, moved, self.new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Rewrite, in place, the rows of contrastive requests; other rows are left untouched.

        One ``contrast()`` call per row: rows may carry different hyperparameters, and the rule is
        the transformers processors' own (``cdlm.decoding._contrast``), so both backends agree.
        """
        for index, state in self.table.items():
            kwargs = state.params.contrast_kwargs()
            row = logits[index : index + 1]
            if kwargs["weight"] == 0.0:
                other = row  # no contrast: skip the amateur (its scores would be multiplied by 0)
            else:
                other = state.amateur_logits().to(logits.device)[None]
            logits[index] = contrast(row, other, **kwargs)[0].to(logits.dtype)
        return logits
