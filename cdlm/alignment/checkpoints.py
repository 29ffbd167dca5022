"""Which ``checkpoint-N`` folder a run can resume from: the newest *complete* one.

A run killed while saving leaves a torn folder (a truncated ``optimizer.pt``, no ``trainer_state.json``);
resuming from it ends in ENOENT or a zip-archive error. Both Trainer and cdlm's PPO trainer write
``trainer_state.json`` last, so a folder is complete when that file parses and every weight or state
file in it is whole (a zip archive with its central directory, a safetensors file as long as its header
says). Torn folders are renamed ``torn-checkpoint-N`` (kept for inspection, ignored by every loader).
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be resumed from (a short reason), or None when it is complete."""
    folder = Path(folder)
    state = folder / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{STATE_FILE} is not valid JSON"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(folder)
        if path.suffix in (".pt", ".bin", ".pth") and not zipfile.is_zipfile(path):
            return f"{name} is truncated or not a torch archive"
        if path.suffix == ".safetensors" and not _whole_safetensors(path):
            return f"{name} is truncated"
    return None


def _whole_safetensors(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError):
        return False
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return path.stat().st_size >= 8 + length + end


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(
    output_dir: str | Path, report: Callable[[str], None] | None = None, set_aside: bool = True
) -> Path | None:
    """The newest complete checkpoint; newer torn ones are reported (and renamed ``torn-checkpoint-N``)."""
    for folder in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if set_aside:
            torn = folder.with_name("torn-" + folder.name)
            if torn.exists():
                import shutil

                shutil.rmtree(torn)
            folder.rename(torn)
        if report is not None:
            where = f"; set aside as torn-{folder.name}" if set_aside else ""
            report(f"{folder} is incomplete ({problem}: a save was interrupted){where}; using the previous one")
    return None
