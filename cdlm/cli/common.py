"""Arguments and helpers shared by several sub-commands (model choice, decoding method, progress)."""

from __future__ import annotations

import argparse
import sys

from cdlm.decoding.methods import _METHODS, DecodingMethod, Param, get_method
from cdlm.models import DEFAULT_MODEL, LoadedModel, load_amateur, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"registered name, GGUF file, folder or hub id (default: {DEFAULT_MODEL})")
    group.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's folder or hub repo")
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    group.add_argument("--debug", action="store_true", help="show full tracebacks")


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
        group.add_argument("--method", action="append", default=None, help="decoding method; repeat to compare (default: greedy)")
    else:
        group.add_argument("--method", default="greedy", help="decoding method (default: greedy)")
    group.add_argument("--amateur", default=None, help="amateur for contrastive methods: 'early-exit:N' or a model reference")
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
        spec = args.amateur or "early-exit:" + str(max(1, _num_layers(expert) // 4))
        if spec not in amateur_cache:
            amateur_cache[spec] = load_amateur(spec, expert, dtype=args.dtype)
        amateur = amateur_cache[spec]
    return method_class(expert.model, expert.tokenizer, amateur=amateur, **params)


def _num_layers(expert: LoadedModel) -> int:
    return int(getattr(expert.model.config, "num_hidden_layers", 4))


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    loaded = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    cache = {None: "", True: ", cache hit", False: ", cache built"}[loaded.cache_hit]
    progress(f"loaded {loaded.source} in {loaded.load_seconds:.1f}s{cache} ({loaded.details['device']}, {loaded.details['dtype']})")
    return loaded


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="generate with transformers (default) or vLLM (greedy, sample, cd, cid; needs cdlm[vllm])",
    )


def generator_from_args(args: argparse.Namespace):
    """The function that generates text for ``args.backend``, with ``cdlm.decoding.runner.generate``'s
    signature, so commands switch backends without knowing which one they use."""
    if args.backend != "vllm":
        from cdlm.decoding.runner import generate

        return generate
    from cdlm.decoding.vllm import load_vllm, runner_compatible

    engine = load_vllm(args.model, gguf_file=args.gguf_file, dtype=args.dtype, max_num_seqs=args.batch_size)
    return runner_compatible(engine)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
