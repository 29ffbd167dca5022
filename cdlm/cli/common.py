"""Arguments and helpers shared by several sub-commands (model choice, decoding method, progress)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cdlm.decoding.methods import _METHODS, DecodingMethod, Param, get_method
from cdlm.models.registry import DEFAULT_MODEL, default_amateur
from cdlm.progress import is_main_process  # noqa: F401  (re-exported: commands import it from here)
from cdlm.progress import message as progress_message

if TYPE_CHECKING:  # loading imports torch: only inside the functions that load
    from cdlm.models.loading import LoadedModel


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered name, GGUF file, folder or hub id (default: {DEFAULT_MODEL})",
    )
    group.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's folder or hub repo")
    group.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (default: auto = float32 on CPU)"
    )
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add_runtime_arguments(group)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_runtime_arguments(group) -> None:
    """Flags every command that runs a model takes: CPU threads, tracebacks, progress bars."""
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--debug", action="store_true", help="show full tracebacks")
    group.add_argument(
        "--verbose", action="store_true", help="show library progress bars (tokenizing, weight loading)"
    )
    group.add_argument(
        "--quiet", action="store_true", help="no progress output on stderr (bars, status lines); results still print"
    )


def apply_runtime_arguments(args: argparse.Namespace) -> None:
    """Called by the CLI before a command runs: quiet switch, library progress bars, thread count (validated first)."""
    import os

    from cdlm import progress as progress_module

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        raise ValueError("--quiet and --verbose contradict each other: give one")
    progress_module.set_quiet(getattr(args, "quiet", False))
    verbose = getattr(args, "verbose", False)
    if not verbose:
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(name, "1")
    # The variables are read when a library is imported; one imported already (a library caller, a test)
    # is switched through its own API, so the first model load's bars follow the same default.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        (transformers_logging.enable_progress_bar if verbose else transformers_logging.disable_progress_bar)()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils

        (huggingface_hub.utils.enable_progress_bars if verbose else huggingface_hub.utils.disable_progress_bars)()
    if hasattr(args, "threads"):
        set_torch_threads(threads)


_THREADS_SOURCE = "torch's default"


def default_threads(environ=None) -> tuple[int, str]:
    """``(threads, why)`` for torch when the user chose none: one per physical core this process may use.

    Logical CPUs (hyperthreads), CPUs outside ``os.sched_getaffinity`` and a cgroup CPU quota only add
    threads that contend (on a loaded 2-core machine greedy SmolLM2 ran 0.3 tokens/s on 2 threads, 5.5
    on 1). The machine's current load is deliberately not used: the thread count can change float
    results, so the same command must pick the same count. Under torchrun every process gets 1.
    """
    import os

    environ = os.environ if environ is None else environ
    try:
        if int(environ.get("LOCAL_WORLD_SIZE", environ.get("WORLD_SIZE", "1"))) > 1:
            return 1, "default: 1 per torchrun process"
    except ValueError:
        pass
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = max(1, len(cores))
    try:  # cgroup v2 quota, e.g. "200000 100000" = 2 CPUs; "max" = none
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return count, f"default: {count} physical cores"


def set_torch_threads(threads: int | None) -> None:
    """``--threads``, else ``OMP_NUM_THREADS`` (torch reads it), else :func:`default_threads`."""
    import os

    import torch

    global _THREADS_SOURCE
    if threads is not None:
        chosen, _THREADS_SOURCE = threads, "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        _THREADS_SOURCE = "OMP_NUM_THREADS"
        return
    else:
        chosen, _THREADS_SOURCE = default_threads()
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)


def torch_threads() -> str:
    """``"2 torch threads (--threads)"``: printed next to throughput, which depends on it."""
    import torch

    return f"{torch.get_num_threads()} torch threads ({_THREADS_SOURCE})"


def check_text_argument(value: str, flag: str) -> str:
    """``value`` when it is UTF-8 text; a command line with other bytes reaches Python as surrogate escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        shown = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"code point {code:#06x}"
        raise ValueError(f"{flag} is not UTF-8 text ({shown} at character {error.start + 1})") from None
    return value


def _method_params() -> dict[str, list[tuple[str, Param]]]:
    """Every registered method's hyperparameters by name: one CLI flag may serve several methods."""
    params: dict[str, list[tuple[str, Param]]] = {}
    for name in _METHODS:
        try:
            method = get_method(name)
        except (ImportError, AttributeError):
            continue
        for param in method.params:
            params.setdefault(param.name, []).append((name, param))
    return params


def add_method_arguments(parser: argparse.ArgumentParser, *, multiple: bool = False) -> None:
    group = parser.add_argument_group("decoding method")
    if multiple:
        group.add_argument(
            "--method", action="append", default=None, help="decoding method; repeat to compare (default: greedy)"
        )
    else:
        group.add_argument("--method", default="greedy", help="decoding method (default: greedy)")
    group.add_argument(
        "--amateur", default=None, help="amateur for contrastive methods: 'early-exit:N' or a model reference"
    )
    for uses in _method_params().values():
        first = uses[0][1]
        if any(param.type is not first.type for _, param in uses):
            raise TypeError(f"methods declare hyperparameter {first.name!r} with different types")
        # Defaults stay None here so each method applies its own documented default.
        described: dict[tuple[str, object], list[str]] = {}
        for method, param in uses:
            described.setdefault((param.help, param.default), []).append(method)
        help_text = "; ".join(f"{'/'.join(m)}: {h} (default {d})" for (h, d), m in described.items())
        group.add_argument(first.flag, dest=first.name, type=first.type, default=None, help=help_text)


def given_hyperparameters(method_class: type[DecodingMethod], args: argparse.Namespace) -> dict:
    """The hyperparameters of ``method_class`` given on the command line (None: not given)."""
    return {p.name: getattr(args, p.name) for p in method_class.params if getattr(args, p.name, None) is not None}


def check_method_settings(args: argparse.Namespace, names: list[str]) -> None:
    """Validate every method's settings before a model loads, and refuse settings no chosen method uses.

    A flag that none of ``names`` reads (``--beta`` with ``cs``, ``--temperature`` or ``--amateur`` with
    ``greedy``) would be accepted and change nothing, so it is refused, as is ``--beta`` with CD's li form.
    """
    classes = [get_method(name) for name in names]
    for method_class in classes:
        method_class.resolve_hyperparameters(given_hyperparameters(method_class, args))
    for flag_name, uses in _method_params().items():
        if getattr(args, flag_name, None) is None:
            continue
        if not any(param.name == flag_name for method_class in classes for param in method_class.params):
            flag = uses[0][1].flag
            users = sorted({method for method, _ in uses})
            raise ValueError(
                f"{flag} is not a setting of method(s) {', '.join(names)} (it is used by {', '.join(users)}); "
                f"drop it, or add --method {users[0]}"
            )
    if getattr(args, "amateur", None) is not None and not any(c.needs_amateur for c in classes):
        raise ValueError(
            f"--amateur is not used by method(s) {', '.join(names)} (only contrastive decoding, --method cd, "
            "has an amateur); drop it"
        )


def build_method(name: str, args: argparse.Namespace, expert: LoadedModel, amateur_cache: dict) -> DecodingMethod:
    """Instantiate method ``name`` with the hyperparameters given on the command line."""
    method_class = get_method(name)
    params = given_hyperparameters(method_class, args)
    amateur = None
    if method_class.needs_amateur:
        spec = args.amateur
        if spec is None:
            spec, why = default_amateur(expert.model.config)
            progress(f"[{name}] amateur: {spec} ({why}; choose another with --amateur)")
        if spec not in amateur_cache:
            from cdlm.models.loading import load_amateur

            amateur_cache[spec] = load_amateur(spec, expert, dtype=args.dtype)
        amateur = amateur_cache[spec]
    return method_class(expert.model, expert.tokenizer, amateur=amateur, **params)


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    from cdlm.models.loading import load_model

    loaded = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    cache = {None: "", True: ", cache hit", False: ", cache built"}[loaded.cache_hit]
    progress(
        f"loaded {loaded.source} in {loaded.load_seconds:.1f}s{cache} "
        f"({loaded.details['device']}, {loaded.details['dtype']})"
    )
    return loaded


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="generate with transformers (default) or vLLM (greedy, sample, cd, cid; needs cdlm[vllm])",
    )


def generator_from_args(args: argparse.Namespace, **engine_options):
    """The function that generates text for ``args.backend``, with ``cdlm.decoding.runner.generate``'s
    signature, so commands switch backends without knowing which one they use. ``engine_options``
    (e.g. ``tensor_parallel_size``) go to the vLLM engine."""
    if args.backend != "vllm":
        from cdlm.decoding.runner import generate

        return generate
    from cdlm.decoding.vllm import load_vllm, runner_compatible
    from cdlm.models.amateur import parse_early_exit

    # An early-exit amateur is read off vLLM's own forward (one norm + head) when the engine captures its layer.
    layer = parse_early_exit(args.amateur) if getattr(args, "amateur", None) else None
    if layer is not None:
        engine_options.setdefault("early_exit_layers", [layer])
    engine = load_vllm(
        args.model, gguf_file=args.gguf_file, dtype=args.dtype, max_num_seqs=args.batch_size, **engine_options
    )
    return runner_compatible(engine)


def progress(message: str) -> None:
    """A progress line on stderr, from the main process only (N ranks would print it N times), unless --quiet."""
    progress_message(message)


def read_text_lines(path: str, flag: str, what: str = "lines") -> list[str]:
    """The non-blank lines (split at "\\n" only) of a UTF-8 file or stream (``/dev/stdin``, a pipe) given by
    ``flag``; a directory, a missing or non-UTF-8 file, or one without a non-blank line is a one-line error."""
    from cdlm.textio import read_text_lines as read_lines

    kept = read_lines(path, f"{flag}")
    if not kept:
        raise ValueError(f"{flag} {path} has no {what} (it is empty or holds only blank lines)")
    return kept
