"""Loading evaluation rows: packaged copies, user jsonl files and (with network) hub datasets.

The packaged files live in ``cdlm/data/{gsm8k,hellaswag}`` (gzip jsonl, MIT-licensed sources; see the
README/LICENSE files next to them) so the default commands run offline. Every row is validated up
front so a malformed file fails with the file, row number and missing field named, instead of a
``KeyError`` deep inside a scoring loop.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from cdlm.textio import MalformedRowError, read_jsonl, read_jsonl_numbered

__all__ = [
    "MalformedRowError",
    "Rows",
    "read_jsonl",
    "load_rows",
    "row_name",
    "validate_rows",
    "take",
    "packaged_path",
]

# name -> file inside cdlm/data
PACKAGED = {
    "gsm8k/test": "gsm8k/test.jsonl.gz",
    "gsm8k/train": "gsm8k/train.jsonl.gz",
    "hellaswag/validation": "hellaswag/hellaswag_val.jsonl.gz",
    # 1,000 validation docs already rendered exactly as lm-eval's hellaswag process_docs does.
    "hellaswag/validation_olmo1000": "hellaswag/hellaswag_val_olmo1000_lmeval_processed.jsonl.gz",
    # prompts + human continuations of the open-ended generation task (two prose domains, dev/test splits)
    "openended": "openended/openended.jsonl.gz",
}

# hub fallbacks for users with network: (path, config name, split)
HUB = {
    "gsm8k/test": ("openai/gsm8k", "main", "test"),
    "gsm8k/train": ("openai/gsm8k", "main", "train"),
    "hellaswag/validation": ("Rowan/hellaswag", None, "validation"),
}


def packaged_path(name: str) -> Path:
    """Path of a packaged data file, e.g. ``packaged_path("gsm8k/test")``."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged dataset {name!r}; known: {', '.join(PACKAGED)}")
    return Path(str(resources.files("cdlm") / "data" / PACKAGED[name]))


def load_hub(name: str) -> list[dict]:
    """The usual hub dataset for ``name`` via ``datasets.load_dataset`` (needs network)."""
    if name not in HUB:
        raise ValueError(f"no hub dataset known for {name!r}; known: {', '.join(HUB)}")
    from datasets import load_dataset

    path, config, split = HUB[name]
    return [dict(row) for row in load_dataset(path, config, split=split)]


class Rows(list):
    """Rows read from a file, remembering the file line each came from, so messages name ``file:LINE``."""

    def __init__(self, numbered: Sequence[tuple[int, dict]], path: str | Path):
        super().__init__(row for _, row in numbered)
        self.lines = [number for number, _ in numbered]
        self.path = str(path)


def _read_rows(path: str | Path) -> Rows:
    return Rows(read_jsonl_numbered(path), path)


def row_name(rows: Sequence[dict], index: int, where: str) -> str:
    """How a message names row ``index``: ``file:LINE`` (what a user can open) when read from a file, else the
    1-based row of ``where`` (hub rows)."""
    if isinstance(rows, Rows):
        return f"{rows.path}:{rows.lines[index]}"
    return f"{where}: row {index + 1}"


def load_rows(source: str | None, default: str) -> tuple[list[dict], str]:
    """Rows from ``source`` (None: the packaged ``default``; ``hub``: the hub copy; else a jsonl path).

    Returns the rows and a description of where they came from (for results files).
    """
    if source is None or source == "packaged":
        return _read_rows(packaged_path(default)), f"packaged:{PACKAGED[default]}"
    if source == "hub":
        return load_hub(default), "hub:" + "/".join(str(p) for p in HUB[default] if p)
    if source in PACKAGED:
        return _read_rows(packaged_path(source)), f"packaged:{PACKAGED[source]}"
    return _read_rows(source), str(Path(source).resolve())


def validate_rows(rows: Sequence[dict], fields: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    """Raise ``MalformedRowError`` naming the first row that lacks a field or has the wrong type."""
    if not rows:
        raise MalformedRowError(f"{where}: no rows")
    for index, row in enumerate(rows):
        for field, kind in fields.items():
            if field not in row or row[field] is None:
                raise MalformedRowError(
                    f"{row_name(rows, index, where)} has no field {field!r} (fields: {sorted(row)})"
                )
            if not isinstance(row[field], kind):
                expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise MalformedRowError(
                    f"{row_name(rows, index, where)} field {field!r} should be {expected}, "
                    f"got {type(row[field]).__name__}"
                )


def take(rows: Sequence[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` rows (all when None); ``limit`` must be positive."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    return list(rows if limit is None else rows[:limit])
