"""Run folders shared by every resumable command (eval, CHES scoring): atomic writes, per-example JSONL, resume.

A run folder holds ``run.json`` (the configuration signature), ``samples.jsonl`` (one record per
finished example, flushed after every batch) and, at the end, ``results.json``. Rerunning the same
command reads the finished examples back and only computes the rest; a different configuration in
the same folder is refused rather than silently mixed. Records are written with
``cdlm.textio.dumps_line`` and read with ``cdlm.textio``'s line reader, so a text holding U+2028,
U+2029 or U+0085 stays one record. It sits below the eval harness and alignment, which both use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cdlm.textio import dumps_line


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


@dataclass(frozen=True)
class Shard:
    """This process's rank among ``world_size`` processes sharing a run folder (one process: rank 0 of 1).

    Only barriers and one small broadcast are needed (``torch.distributed``, imported when there are
    several ranks), so the process group is gloo on CPU and GPU alike.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk_index: int) -> bool:
        return chunk_index % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_from_main(self, value):
        """``value`` as rank 0 has it, on every rank (e.g. the outcome of a check only rank 0 makes)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(dumps_line(record) + "\n" for record in records)


class RunFolder:
    """``run.json`` + per-example records (+ ``results.json``) of one run; see the module docstring.

    With several processes each rank appends to ``samples.rank<R>.jsonl`` and rank 0 merges them into
    ``samples.jsonl`` (``merge``). Records are keyed by example index, so a run resumes from whatever
    files a previous run left, with any number of processes.
    """

    def __init__(self, folder: str | Path, shard: Shard | None = None):
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
    def open(
        cls, folder: str | Path, signature: dict, *, overwrite: bool = False, shard: Shard | None = None
    ) -> "RunFolder":
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

    @classmethod
    def check(cls, folder: str | Path, signature: dict) -> None:
        """Refuse (``ValueError`` naming what changed) when ``folder`` holds another run; writes nothing."""
        from cdlm.run_identity import check_same_run

        path = cls(folder).signature_path
        if path.exists():
            check_same_run(
                json.loads(path.read_text(encoding="utf-8")),
                json.loads(json.dumps(signature, default=str)),
                folder=str(folder),
                restart_hint="use another --output-dir or pass --overwrite",
            )

    def _claim(self, signature: dict, overwrite: bool) -> None:
        if overwrite:
            for path in (*self._sample_files(), self.results_path, self.signature_path):
                path.unlink(missing_ok=True)
        if self.signature_path.exists():
            self.check(self.folder, signature)
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
        data = path.read_bytes()
        # Lines end at "\n" only (cdlm.textio's rule): a record is torn only when its newline is missing.
        complete, _, torn = data.rpartition(b"\n")
        lines = complete.split(b"\n") if complete else []
        for number, raw in enumerate(lines, 1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if number == len(lines) and not torn:  # the last line of a killed run
                    break
                raise ValueError(f"{path}:{number} is not a valid JSON record; delete the file or pass --overwrite")
            index = record.get("index") if isinstance(record, dict) else None
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError(
                    f"{path}:{number} has no integer 'index' field, so it is not a cdlm samples record; "
                    "delete the file or pass --overwrite"
                )
            records[index] = record
        if repair and (torn or len(records) != len(lines)):
            atomic_write_text(path, _jsonl(records.values()))
        return records

    def append(self, records: Iterable[dict]) -> None:
        with open(self.own_samples_path, "a", encoding="utf-8") as handle:
            handle.write(_jsonl(records))
            handle.flush()
            os.fsync(handle.fileno())

    def merge(self) -> dict[int, dict]:
        """All records, written to ``samples.jsonl`` in index order; the per-rank files are then removed."""
        records = self.finished()
        rank_files = [p for p in self._sample_files() if p != self.samples_path and p.exists()]
        if rank_files:
            atomic_write_text(self.samples_path, _jsonl(records[i] for i in sorted(records)))
            for path in rank_files:
                path.unlink()
        return records

    def read_results(self) -> dict:
        return json.loads(self.results_path.read_text(encoding="utf-8"))
