"""Run folders: per-example JSONL appended as examples finish, atomic results JSON, resume checks.

A run folder holds ``run.json`` (the configuration signature), ``samples.jsonl`` (one record per
finished example, flushed after every batch) and, at the end, ``results.json``. Rerunning the same
command reads the finished examples back and only computes the rest; a different configuration in
the same folder is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder + ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


class RunFolder:
    def __init__(self, folder: str | Path, signature: dict, *, overwrite: bool = False):
        self.folder = Path(folder)
        self.samples_path = self.folder / "samples.jsonl"
        self.results_path = self.folder / "results.json"
        self.signature_path = self.folder / "run.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        signature = json.loads(json.dumps(signature, default=str))
        if overwrite:
            for path in (self.samples_path, self.results_path, self.signature_path):
                path.unlink(missing_ok=True)
        if self.signature_path.exists():
            previous = json.loads(self.signature_path.read_text(encoding="utf-8"))
            if previous != signature:
                changed = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
                raise ValueError(
                    f"{self.folder} holds a run with a different configuration (differs in: {', '.join(changed)}); "
                    "use another --output-dir or pass --overwrite"
                )
        else:
            atomic_write_json(self.signature_path, signature)

    def finished(self) -> dict[int, dict]:
        """Records already written, by example index. A torn last line (a killed run) is dropped."""
        records: dict[int, dict] = {}
        if not self.samples_path.exists():
            return records
        lines = self.samples_path.read_text(encoding="utf-8").splitlines(keepends=True)
        good = 0
        for line in lines:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            records[int(record["index"])] = record
            good += len(line.encode("utf-8"))
        if good != self.samples_path.stat().st_size:  # rewrite without the torn tail so appends stay valid
            atomic_write_text(
                self.samples_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records.values())
            )
        return records

    def append(self, records: Iterable[dict]) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
