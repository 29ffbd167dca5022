"""Data-parallel evaluation: which processing chunks this process computes, and the collectives between ranks.

Under ``torchrun --nproc_per_node N cdlm eval ...`` every rank loads the model, builds the same
requests and computes the chunks ``k`` with ``k % N == rank`` (``evaluate`` cuts the documents into
fixed chunks). A chunk is batched exactly as in a one-process run, so each per-example record is
what one process computes; each rank appends to its own ``samples.rank<R>.jsonl`` (resumable per
shard) and rank 0 merges them into ``samples.jsonl`` and writes ``results.json``.

Only barriers and one small broadcast are needed, so the process group is gloo on CPU and GPU alike.
"""

from __future__ import annotations

import os

# A shard is a run-folder notion (ranks append their own records); it lives with the run folders.
from cdlm.runs import Shard

__all__ = ["Shard", "current_shard", "init_from_launcher", "launched_world_size", "local_device"]


def launched_world_size() -> int:
    """The process count a launcher (torchrun) asked for; 1 when started directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_launcher() -> Shard:
    """Join the process group torchrun describes (gloo) and return this process's shard; 1 process: no group."""
    if launched_world_size() <= 1:
        return Shard()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def current_shard() -> Shard:
    """The shard of an already initialised process group, else one process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return Shard()
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def local_device(device: str, shard: Shard) -> str:
    """``auto``/``cuda`` on a multi-process GPU run means this rank's own GPU (``LOCAL_RANK``)."""
    if shard.world_size == 1 or device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank)) % torch.cuda.device_count()}"
