"""An on-disk cache of dequantised GGUF models (safetensors + tokenizer files).

Dequantising a GGUF through transformers takes 17 s (SmolLM2-135M) to 46 s (Gemma-3-270M) on two CPU
cores, while loading the same weights from safetensors takes well under a second. So the first load
of a GGUF writes a regular ``save_pretrained`` folder here and later loads read it.

Why entries are trusted only with a manifest: an entry is built in a temporary folder and renamed into
place in one step, after a ``manifest.json`` listing every file with its size and sha256 is written.
A folder without a manifest (a crash mid-build), or whose files do not match it (truncation, bit rot,
a hand edit), is treated as a miss: it is removed and rebuilt, never loaded. Hashing is cheap next to
loading (0.4 s for SmolLM2's 540 MB on this machine); set ``CDLM_CACHE_VERIFY=sizes`` to check sizes
only.

Entries are keyed by what their source file *is* (its sha256), not where it lies, so a second checkout
or virtual environment with the same GGUF reuses the entry. The hash of a source file is remembered
per (path, size, mtime) in ``file-hashes.json``, so only a new or changed file is hashed.

A build killed half-way leaves its temporary folder behind (hundreds of MB); its name carries the
building process's id, and the next build removes the folders of processes that no longer run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
HASH_INDEX = "file-hashes.json"
_TEMP_MARK = ".building-pid"


def cache_root() -> Path:
    """``$CDLM_CACHE``, else ``$XDG_CACHE_HOME/cdlm``, else ``~/.cache/cdlm``."""
    explicit = os.environ.get("CDLM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cdlm"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a (large, read-only) source file, remembered per resolved path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    index_path = cache_root() / HASH_INDEX
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    if key not in index:
        index[key] = _file_digest(path)
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = index_path.with_name(f"{HASH_INDEX}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(index, indent=1, sort_keys=True))
            os.replace(temporary, index_path)
        except OSError:
            pass  # a read-only cache only costs re-hashing
    return index[key]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_builds(folder: Path) -> list[Path]:
    """Remove temporary build folders in ``folder`` whose building process is gone; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        name = candidate.name
        if not (candidate.is_dir() and name.startswith(".") and _TEMP_MARK in name):
            continue
        pid_text = name.split(_TEMP_MARK, 1)[1].split(".", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@dataclass(frozen=True)
class CacheEntry:
    """One cached model folder, keyed by what it was built from."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict | None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            return None
        return manifest

    def problem(self, verify: str = "sha256") -> str | None:
        """Why this entry must not be loaded, or None when it is complete and intact."""
        if not self.path.is_dir():
            return "missing"
        manifest = self.read_manifest()
        if manifest is None:
            return "no valid manifest (partial or foreign folder)"
        files = manifest.get("files", {})
        if not files:
            return "manifest lists no files"
        for name, expected in files.items():
            file_path = self.path / name
            if not file_path.is_file():
                return f"{name} is missing"
            if file_path.stat().st_size != expected["size"]:
                return f"{name} has {file_path.stat().st_size} bytes, manifest says {expected['size']}"
            if verify == "sha256" and _file_digest(file_path) != expected["sha256"]:
                return f"{name} does not match its sha256"
        return None

    def is_valid(self, verify: str = "sha256") -> bool:
        return self.problem(verify) is None


def _verify_mode() -> str:
    mode = os.environ.get("CDLM_CACHE_VERIFY", "sha256").lower()
    if mode not in {"sha256", "sizes"}:
        raise ValueError(f"CDLM_CACHE_VERIFY must be 'sha256' or 'sizes', not {mode!r}")
    return mode


def get_or_build(entry: CacheEntry, build: Callable[[Path], None], source: dict) -> tuple[Path, bool]:
    """Return (folder, was_hit). On a miss, ``build(tmp_dir)`` writes the files and they are published.

    ``source`` is recorded in the manifest so a person can tell what an entry was made from.
    """
    verify = _verify_mode()
    if entry.is_valid(verify):
        return entry.path, True
    if entry.path.exists():
        shutil.rmtree(entry.path, ignore_errors=True)
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(entry.path.parent)
    prefix = f".{entry.path.name}{_TEMP_MARK}{os.getpid()}."
    tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=entry.path.parent))
    try:
        build(tmp_dir)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)}
            for p in sorted(tmp_dir.iterdir())
            if p.is_file()
        }
        manifest = {"format": FORMAT_VERSION, "source": source, "files": files}
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp_dir, entry.path)
        except OSError:
            # Another process published the same entry first; keep theirs if it is valid.
            if not entry.is_valid(verify):
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return entry.path, False


def list_entries() -> list[CacheEntry]:
    models_dir = cache_root() / "models"
    if not models_dir.is_dir():
        return []
    return [CacheEntry(p) for p in sorted(models_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
