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
    """``run.json`` + per-example records (+ ``results.json``) of one evaluation; see the module docstring.

    With several processes each rank appends to ``samples.rank<R>.jsonl`` and rank 0 merges them into
    ``samples.jsonl`` (``merge``). Records are keyed by example index, so a run resumes from whatever
    files a previous run left, with any number of processes.
    """

    def __init__(self, folder: str | Path, shard=None):
        from cdlm.eval_harness.distributed import Shard

        self.folder = Path(folder)
        self.shard = shard or Shard()
        self.samples_path = self.folder / "samples.jsonl"
        self.results_path = self.folder / "results.json"
        self.signature_path = self.folder / "run.json"

    @property
    def own_samples_path(self) -> Path:
        """Where this process appends: ``samples.jsonl`` alone, ``samples.rank<R>.jsonl`` in a multi-process run."""
        return (
            self.samples_path if self.shard.world_size == 1 else self.folder / f"samples.rank{self.shard.rank}.jsonl"
        )

    def _sample_files(self) -> list[Path]:
        return [self.samples_path, *sorted(self.folder.glob("samples.rank*.jsonl"))]

    @classmethod
    def open(cls, folder: str | Path, signature: dict, *, overwrite: bool = False, shard=None) -> "RunFolder":
        """Check ``signature`` against the folder's ``run.json`` (refusing a different run, naming what changed)
        and write it for a new run. Rank 0 checks and writes; the other ranks get its verdict."""
        run = cls(folder, shard)
        signature = json.loads(json.dumps(signature, default=str))
        error = None
        if run.shard.is_main:
            try:
                run._claim(signature, overwrite)
            except ValueError as failure:
                error = str(failure)
        error = run.shard.broadcast_from_main(error)
        if error:
            raise ValueError(error)
        return run

    def _claim(self, signature: dict, overwrite: bool) -> None:
        if overwrite:
            for path in (*self._sample_files(), self.results_path, self.signature_path):
                path.unlink(missing_ok=True)
        if self.signature_path.exists():
            from cdlm.run_identity import check_same_run

            previous = json.loads(self.signature_path.read_text(encoding="utf-8"))
            check_same_run(
                previous,
                signature,
                folder=str(self.folder),
                restart_hint="use another --output-dir or pass --overwrite",
            )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.signature_path, signature)

    def finished(self) -> dict[int, dict]:
        """Records already written, by example index. A torn last line (a killed run) is dropped, and cut
        from the file this process appends to so that its appends stay valid JSONL."""
        records: dict[int, dict] = {}
        for path in self._sample_files():
            records.update(self._read(path, repair=path == self.own_samples_path))
        return records

    def _read(self, path: Path, *, repair: bool) -> dict[int, dict]:
        records: dict[int, dict] = {}
        if not path.exists():
            return records
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        good = 0
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a torn last line of a killed run
                    break
                raise ValueError(
                    f"{path}: line {number} is not valid JSON; delete the file or pass --overwrite"
                ) from None
            index = record.get("index") if isinstance(record, dict) else None
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError(
                    f"{path}: line {number} has no integer 'index' field, so it is not a cdlm samples record; "
                    "delete the file or pass --overwrite"
                )
            records[index] = record
            good += len(line.encode("utf-8"))
        if repair and good != path.stat().st_size:
            atomic_write_text(
                path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records.values())
            )
        return records

    def append(self, records: Iterable[dict]) -> None:
        with open(self.own_samples_path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def merge(self) -> dict[int, dict]:
        """All records, written to ``samples.jsonl`` in index order; the per-rank files are then removed."""
        records = self.finished()
        rank_files = [p for p in self._sample_files() if p != self.samples_path and p.exists()]
        if rank_files:
            ordered = "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in sorted(records))
            atomic_write_text(self.samples_path, ordered)
            for path in rank_files:
                path.unlink()
        return records

    def read_results(self) -> dict:
        return json.loads(self.results_path.read_text(encoding="utf-8"))
