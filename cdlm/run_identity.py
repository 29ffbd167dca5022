"""What identifies a run, so a resumed run can prove it continues the same computation.

Eval runs, CHES scoring and training runs each record a signature (model weights, data contents,
settings) next to their outputs and compare it when rerun into the same folder: one home for the
fingerprints and for the comparison, so every resumable command refuses a changed run the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any


def weights_fingerprint(model) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and a strided sample of every tensor.

    Two different checkpoints (or a fine-tune of one) differ in essentially every tensor, so they get
    different fingerprints; computing it reads ~256 values per tensor, not the whole model. The dtype
    is part of it: the same checkpoint in float32 and bfloat16 gives different numbers.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].to(device="cpu", dtype=torch.float32)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def rows_fingerprint(rows: Iterable[Any]) -> str:
    """sha256 of the rows' canonical JSON: equal iff the contents are equal, whatever the file's path or form."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def signature_differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) signatures, e.g. ``"dtype: float32 -> bfloat16"``."""
    differences = []
    for key in sorted(set(recorded) | set(current), key=str):
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += signature_differences(old, new, f"{prefix}{key}.")
        elif _canonical(old) != _canonical(new):
            differences.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return differences


def check_same_run(recorded: Mapping[str, Any], current: Mapping[str, Any], *, folder: str, restart_hint: str) -> None:
    """Raise ``ValueError`` naming what changed when ``current`` does not continue ``recorded``."""
    differences = signature_differences(recorded, current)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ValueError(f"{folder} holds a run with other settings ({shown}); {restart_hint}")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else _canonical(value)
    return text if len(text) <= 40 else text[:37] + "..."
