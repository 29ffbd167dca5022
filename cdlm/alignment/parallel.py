"""What the trainers need to know about how ``accelerate`` distributes them.

``torchrun --nproc_per_node N`` on a machine without GPUs: ``accelerate`` (and so ``Trainer``) only runs
gloo data parallelism when the run is marked as CPU (``use_cpu=True``); without it every process trains
alone on the whole data set and all of them write the same output folder, silently. The configs call
:func:`use_cpu_for_cpu_launch` so the plain ``torchrun`` command does the right thing, and the trainers
call :func:`check_launch` to refuse any other mismatch between the launcher and accelerate.

Data parallelism (DDP: ``torchrun`` or ``accelerate launch`` with a multi-GPU/CPU config) and DeepSpeed
ZeRO-1/2 give every process the full weights. DeepSpeed ZeRO-3 and FSDP shard them: a parameter read
outside the wrapped model's forward is then a shard (or empty), so code that applies the LM head's
weights itself (SparsePO's and DistiLLM-2's chunked heads) would compute garbage. Those trainers call
:func:`refuse_sharded_weights` instead of silently training wrong.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started: ``WORLD_SIZE``-like variables."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def _has_accelerator() -> bool:
    import torch

    for backend in ("cuda", "xpu", "npu", "mlu", "musa", "hpu"):
        module = getattr(torch, backend, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            return True
    return False


def requested_sharding() -> str | None:
    """``"FSDP"`` or ``"DeepSpeed"`` when ``accelerate launch`` was given such a config (its environment variables)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    return None


def sharding_problem(sharding: str | None) -> str | None:
    """Why a launch with ``sharding`` (``"DeepSpeed"``, ``"FSDP"`` or None) cannot run here, or None.

    One rule for the trainers (checked on start, before any work) and ``cdlm doctor`` (checked before
    ``accelerate launch``, whose own failure is a traceback from inside its launcher).
    """
    import importlib.util

    if sharding == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        return (
            "the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed "
            "(it needs CUDA GPUs); on CPUs launch with torchrun --nproc_per_node N instead"
        )
    if sharding in ("DeepSpeed", "FSDP") and not _has_accelerator():
        return f"the accelerate config asks for {sharding}, which needs GPUs: on CPUs use torchrun --nproc_per_node N"
    return None


def is_cpu_launch() -> bool:
    """True for a plain multi-process launch (no FSDP/DeepSpeed config) on a machine without an accelerator."""
    return launched_processes() > 1 and not _has_accelerator() and requested_sharding() is None


def use_cpu_for_cpu_launch(config: Any) -> None:
    """Set ``config.use_cpu`` for a plain multi-process launch on a machine without GPUs (see the module docstring).

    Call it in a ``TrainingArguments`` subclass's ``__post_init__`` before ``super().__post_init__()``.
    """
    if not config.use_cpu and is_cpu_launch():
        config.use_cpu = True


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a run whose launcher started more processes than accelerate trains with (independent copies)."""
    requested = requested_sharding()
    actual = accelerator.distributed_type
    if (
        requested == "FSDP"
        and actual != DistributedType.FSDP
        or requested == "DeepSpeed"
        and actual != DistributedType.DEEPSPEED
    ):
        raise ValueError(
            f"the accelerate config asks for {requested} but accelerate runs {actual.value}: {requested} needs GPUs "
            "(on CPUs use a plain multi-process launch: torchrun --nproc_per_node N)"
        )
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise ValueError(
            f"the launcher started {launched} processes but accelerate runs {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type.value}): every process would train alone on all "
            "the data. On CPUs pass use_cpu=True (--use-cpu); on GPUs check that every process sees a GPU."
        )


def sharded_weights(accelerator: Accelerator) -> str | None:
    """The name of the weight-sharding scheme in use (``"FSDP"``, ``"DeepSpeed ZeRO-3"``), or None."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "FSDP"
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def refuse_sharded_weights(accelerator: Accelerator, what: str) -> None:
    """Raise ``ValueError`` when the weights are sharded across processes (see the module docstring)."""
    scheme = sharded_weights(accelerator)
    if scheme is not None:
        raise ValueError(
            f"{what} applies the LM head's weights outside the model's forward, so every process needs the full "
            f"weights, and {scheme} shards them: use DDP (torchrun) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2.yaml)"
        )


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Under a multi-process launch, the main process runs the block first and the others after it.

    For steps that write a shared file (baseline caches, pair files): the main process writes it and every
    other process then finds it complete and only reads it. One process: runs the block.
    """
    if launched_processes() > 1:
        from accelerate import PartialState

        with PartialState(cpu=is_cpu_launch()).main_process_first():
            yield
    else:
        yield
