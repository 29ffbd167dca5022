"""Per-request contrastive-decoding settings carried in vLLM's ``SamplingParams.extra_args``.

vLLM hands every custom logits processor each request's ``SamplingParams``; the only free-form slot
in it is ``extra_args`` (a dict). cdlm puts one key there, ``"cdlm"``, whose value is the dict built by
``ContrastParams.to_extra_args()``. Requests without that key are left untouched by the processor, so
greedy, sampled and contrastive requests can share one engine and one batch.

This module imports neither vLLM nor transformers: the parsing and validation run (and are tested)
without vLLM installed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

EXTRA_ARGS_KEY = "cdlm"
METHODS = ("cd", "cid")
FORMULATIONS = ("obrien-lewis", "li")  # as cdlm.decoding.contrastive_decoding
# The amateur spec that means "the expert itself" (CID contrasts two inputs to one model).
SELF_AMATEUR = "self"


@dataclass(frozen=True)
class ContrastParams:
    """The contrastive settings of one request; names and defaults match cdlm's transformers methods.

    Attributes:
        method: ``"cd"`` (expert vs amateur model on the same text; ``--method cd``) or ``"cid"``
            (the expert on the prompt vs the expert on ``contrastive_prompt_token_ids``; ``--method cid``).
        amateur: where the amateur's scores come from: ``"early-exit:N"`` (the expert's first N
            layers, run by transformers), ``"self"`` (the expert, run by transformers; CID's only
            choice), a name registered with ``register_amateur``, or a ``cdlm.models.load_model``
            reference.
        alpha: plausibility threshold in (0, 1]: tokens with ``p_e < alpha * max p_e`` are excluded.
        beta: CD contrast strength >= 0 for the O'Brien-Lewis form (unused by the Li form).
        amateur_temperature: CD: the amateur's logits are divided by it (> 0).
        cd_formulation: CD: ``"obrien-lewis"`` or ``"li"``.
        cid_lambda: CID contrast strength lambda >= 0.
        contrastive_prompt_token_ids: CID only: the contrastive input, tokenised exactly as the
            prompt was (vLLM only ever sees token ids).
    """

    method: str = "cd"
    amateur: str | None = None
    alpha: float = 0.1
    beta: float = 0.5
    amateur_temperature: float = 1.0
    cd_formulation: str = "obrien-lewis"
    cid_lambda: float = 0.5
    contrastive_prompt_token_ids: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"cdlm vLLM method must be one of {METHODS}, got {self.method!r}")
        if self.cd_formulation not in FORMULATIONS:
            raise ValueError(f"cd_formulation must be one of {FORMULATIONS}, got {self.cd_formulation!r}")
        for name in ("alpha", "beta", "amateur_temperature", "cid_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha (plausibility threshold) must be in (0, 1], got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.cid_lambda < 0:
            raise ValueError(f"cid_lambda must be >= 0, got {self.cid_lambda}")
        if self.amateur_temperature <= 0:
            raise ValueError(f"amateur_temperature must be > 0, got {self.amateur_temperature}")
        if self.method == "cid":
            ids = self.contrastive_prompt_token_ids
            if not ids:
                raise ValueError("method 'cid' needs contrastive_prompt_token_ids (the tokenised contrastive input)")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError("contrastive_prompt_token_ids must be non-negative integers")
            object.__setattr__(self, "contrastive_prompt_token_ids", tuple(ids))
            if self.amateur not in (None, SELF_AMATEUR):
                raise ValueError(f"method 'cid' contrasts the expert with itself; amateur must be unset or 'self', got {self.amateur!r}")
            object.__setattr__(self, "amateur", SELF_AMATEUR)
            return
        if self.contrastive_prompt_token_ids is not None:
            raise ValueError("contrastive_prompt_token_ids is only used by method 'cid'")
        if self.amateur is None:
            raise ValueError("method 'cd' needs an amateur (e.g. 'early-exit:8' or a model reference)")
        if not isinstance(self.amateur, str) or not self.amateur:
            raise ValueError(f"amateur must be a non-empty string, got {self.amateur!r}")

    def contrast_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``cdlm.decoding._contrast.contrast``, exactly as the transformers
        processors build them (``ContrastiveDecodingLogitsProcessor`` / ``ContrastiveInputLogitsProcessor``)."""
        if self.method == "cid":
            return {"alpha": self.alpha, "weight": self.cid_lambda, "formulation": "li", "other_temperature": 1.0}
        weight = 1.0 if self.cd_formulation == "li" else self.beta
        return {
            "alpha": self.alpha,
            "weight": weight,
            "formulation": self.cd_formulation,
            "other_temperature": self.amateur_temperature,
        }

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> "ContrastParams | None":
        """Parse a request's ``extra_args``; ``None`` when the request is not contrastive."""
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        raw = extra_args[EXTRA_ARGS_KEY]
        if not isinstance(raw, Mapping):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown cdlm contrastive setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(raw)
        if values.get("contrastive_prompt_token_ids") is not None:
            values["contrastive_prompt_token_ids"] = tuple(values["contrastive_prompt_token_ids"])
        return cls(**values)

    def to_extra_args(self) -> dict[str, dict[str, Any]]:
        """The ``extra_args`` dict for ``SamplingParams`` (JSON-serialisable, so it survives IPC)."""
        values = asdict(self)
        if values["contrastive_prompt_token_ids"] is not None:
            values["contrastive_prompt_token_ids"] = list(values["contrastive_prompt_token_ids"])
        return {EXTRA_ARGS_KEY: values}
