"""Arguments and helpers shared by several sub-commands (model choice, decoding method, progress)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cdlm.decoding.methods import _METHODS, DecodingMethod, Param, get_method
from cdlm.models.registry import DEFAULT_MODEL, default_amateur

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


def apply_runtime_arguments(args: argparse.Namespace) -> None:
    """Called by the CLI before a command runs: quiet progress bars, thread count (validated first)."""
    import os

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if not getattr(args, "verbose", False):
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(name, "1")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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


def build_method(name: str, args: argparse.Namespace, expert: LoadedModel, amateur_cache: dict) -> DecodingMethod:
    """Instantiate method ``name`` with the hyperparameters given on the command line."""
    method_class = get_method(name)
    params = {p.name: getattr(args, p.name) for p in method_class.params if getattr(args, p.name, None) is not None}
    amateur = None
    if method_class.needs_amateur:
        spec = args.amateur or default_amateur(args.model, _num_layers(expert))
        if spec not in amateur_cache:
            from cdlm.models.loading import load_amateur

            amateur_cache[spec] = load_amateur(spec, expert, dtype=args.dtype)
        amateur = amateur_cache[spec]
    return method_class(expert.model, expert.tokenizer, amateur=amateur, **params)


def _num_layers(expert: LoadedModel) -> int:
    return int(getattr(expert.model.config, "num_hidden_layers", 4))


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


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain run): the one process that reports and writes."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def progress(message: str) -> None:
    """A progress line on stderr, from the main process only (N ranks would print it N times)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def read_text_lines(path: str, flag: str, what: str = "lines") -> list[str]:
    """The non-blank lines (split at "\\n" only) of a UTF-8 file or stream (``/dev/stdin``, a pipe) given by
    ``flag``; a directory, a missing or non-UTF-8 file, or one without a non-blank line is a one-line error."""
    from cdlm.textio import read_text_lines as read_lines

    kept = read_lines(path, f"{flag}")
    if not kept:
        raise ValueError(f"{flag} {path} has no {what} (it is empty or holds only blank lines)")
    return kept
