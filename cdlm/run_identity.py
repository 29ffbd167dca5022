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
    """sha256 of every byte of a model's weights, with each tensor's name, shape and dtype.

    Any edit (one value of one embedding row) changes it, and so does the dtype (the same checkpoint in
    float32 and bfloat16 gives different numbers). It is recomputed on every call, never cached: an
    in-place edit through ``.data``, numpy or an inference-mode tensor leaves torch's version counter
    and the storage pointer unchanged, so a cache keyed on them could return a stale hash. Tensors are
    streamed one at a time (SmolLM2-135M, 540 MB in float32: about 1 s on one CPU core).
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.device.type == "meta":
                raise ValueError(f"cannot fingerprint weight {name!r}: it is on the meta device (not loaded)")
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                digest.update(data.view(torch.uint8).numpy().data)
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
