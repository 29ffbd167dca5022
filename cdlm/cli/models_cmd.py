"""``cdlm models``: the registered model names, whether their package is installed and cached."""

from __future__ import annotations

import argparse

from cdlm.models.cache import cache_root, list_entries
from cdlm.models.registry import DEFAULT_MODEL, REGISTRY


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list registered models and the dequantised-model cache")
    parser.add_argument("--verify", action="store_true", help="check every cache entry's sha256")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    entries = list_entries()
    print(f"cache: {cache_root()}")
    print(f"{'name':24} {'installed':9} {'cached':6}  description")
    for name, model in REGISTRY.items():
        stem = model.gguf_file.removesuffix(".gguf")
        cached = any(e.path.name.startswith(stem + "-") and e.is_valid("sizes") for e in entries)
        marker = " (default)" if name == DEFAULT_MODEL else ""
        print(
            f"{name:24} {'yes' if model.is_installed() else 'no':9} {'yes' if cached else 'no':6}  "
            f"{model.description}{marker}"
        )
    if args.verify:
        for entry in entries:
            problem = entry.problem("sha256")
            print(f"{entry.path.name}: {'ok' if problem is None else problem}")
    return 0
