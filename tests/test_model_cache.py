"""The dequantised-model cache: keyed by file contents, abandoned builds cleaned up (issue 15, items 9 and 17)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from cdlm.models import cache
from cdlm.models.cache import CacheEntry, file_sha256, get_or_build, remove_abandoned_builds


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path / "cache"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_entry_key_follows_contents_not_path(tmp_path):
    from cdlm.models.loading import _gguf_cache_entry

    first = tmp_path / "checkout-a" / "model.gguf"
    second = tmp_path / "venv-b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    shutil.copy(first, second)
    os.utime(second, ns=(1, 1))  # another install: other path, other mtime, same bytes
    assert _gguf_cache_entry(first).path == _gguf_cache_entry(second).path
    second.write_bytes(b"GGUF" + bytes(range(256)) * 63)
    assert _gguf_cache_entry(first).path != _gguf_cache_entry(second).path


def test_file_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"abc")
    calls = []
    real = cache._file_digest
    monkeypatch.setattr(cache, "_file_digest", lambda p: calls.append(p) or real(p))
    digest = file_sha256(path)
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert file_sha256(path) == digest and len(calls) == 1
    path.write_bytes(b"abcd")
    assert file_sha256(path) != digest and len(calls) == 2


def test_builds_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    folder = tmp_path / "models"
    dead = folder / f".entry.building-pid{_dead_pid()}.x1"
    live = folder / f".entry.building-pid{os.getpid()}.x2"
    published = folder / "entry"
    for path in (dead, live, published):
        path.mkdir(parents=True)
    assert remove_abandoned_builds(folder) == [dead]
    assert not dead.exists() and live.exists() and published.exists()


def test_a_killed_build_leaves_nothing_after_the_next_build(tmp_path):
    models = cache.cache_root() / "models"
    leftover = models / f".old.building-pid{_dead_pid()}.abc"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 1024)
    entry = CacheEntry(models / "new")
    folder, hit = get_or_build(entry, lambda tmp: (tmp / "weights.bin").write_bytes(b"w"), {"test": True})
    assert not hit and (folder / "weights.bin").read_bytes() == b"w"
    assert sorted(p.name for p in models.iterdir()) == ["new"]


def test_a_failing_build_removes_its_temporary_folder():
    models = cache.cache_root() / "models"

    def fail(tmp):
        (tmp / "partial").write_bytes(b"x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        get_or_build(CacheEntry(models / "entry"), fail, {})
    assert list(models.iterdir()) == []
