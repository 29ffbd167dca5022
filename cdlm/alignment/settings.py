"""The value rules every trainer setting obeys, in one place: finite numbers, sane ranges, no secrets on disk.

``TrainingArguments`` accepts ``learning_rate=inf``, ``gradient_accumulation_steps=0`` or a NaN warmup and
fails much later (a traceback, or a finished run with non-finite weights). The trainer configs call
:func:`check_values` in ``__post_init__`` and the CLI calls it on the merged settings with flag names, so
a bad value is refused before a model is loaded, naming the setting. No torch, no third-party imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_INT64 = 2**63
# Range rules of settings whose bad values would otherwise fail late: (rule shown in the message, test).
RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "gradient_accumulation_steps": (">= 1", lambda v: v >= 1),
    "per_device_train_batch_size": (">= 1", lambda v: v >= 1),
    "per_device_eval_batch_size": (">= 1", lambda v: v >= 1),
    "warmup_steps": (">= 0", lambda v: v >= 0),
    "learning_rate": (">= 0", lambda v: v >= 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "max_grad_norm": (">= 0", lambda v: v >= 0),
    "logging_steps": ("> 0", lambda v: v > 0),
    "save_steps": (">= 0", lambda v: v >= 0),
    "save_total_limit": (">= 0", lambda v: v >= 0),
    "seed": ("in [0, 2**32 - 1] (numpy's seed range)", lambda v: 0 <= v < 2**32),
}

SECRET_WORDS = ("token", "password", "secret")
"""A setting whose name contains one of these is a credential: never written to a run record."""


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def without_secrets(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without credentials (``hub_token``...), for files written next to a run."""
    return {key: value for key, value in settings.items() if not is_secret(str(key))}


def check_value(name: str, value: Any, shown: str | None = None) -> None:
    """Raise ``ValueError`` naming ``shown`` (default ``name``) for a non-finite number or one out of its range."""
    shown = shown or name
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{shown} must be a finite number, got {item}")
        if isinstance(item, int) and not -_INT64 <= item < _INT64:
            raise ValueError(f"{shown} is out of range (a 64-bit integer), got {item}")
        if name in RANGES and not RANGES[name][1](item):
            raise ValueError(f"{shown} must be {RANGES[name][0]}, got {item}")


def check_values(config: Any, names: Iterable[str] | None = None) -> None:
    """:func:`check_value` on the numeric fields of a dataclass config (or only ``names``)."""
    import dataclasses

    for field in dataclasses.fields(config):
        if (names is None or field.name in names) and field.init:
            check_value(field.name, getattr(config, field.name, None))
