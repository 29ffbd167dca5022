"""The ``cdlm`` command line. Each sub-command lives in its own module with a ``register`` function.

Building the parser imports every command module, so their top level and ``register`` stay free of
torch, transformers and TRL (imported inside ``run``): ``cdlm --help`` and ``cdlm CMD --help`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cdlm import __version__
from cdlm.cli.common import apply_runtime_arguments
from cdlm.errors import USER_ERRORS

# Sub-command modules, in --help order. A module that is absent (an optional area not installed)
# is skipped so the rest of the CLI keeps working.
COMMAND_MODULES = [
    "cdlm.cli.models_cmd",
    "cdlm.cli.generate_cmd",
    "cdlm.cli.eval_cmd",
    "cdlm.cli.train_cmd",
    "cdlm.cli.distill_cmd",
    "cdlm.cli.rl_cmd",
    "cdlm.cli.data_cmd",
    "cdlm.cli.isotropy_cmd",
    "cdlm.cli.serve_cmd",
    "cdlm.cli.doctor_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdlm", description="Contrastive decoding, search, evaluation and alignment for causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"cdlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def offline_by_default() -> None:
    """Command-line defaults: no network is expected, so never wait on a hub that cannot answer."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


def main(argv: list[str] | None = None) -> int:
    offline_by_default()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        apply_runtime_arguments(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cdlm: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if getattr(args, "debug", False):
            raise
        print(f"cdlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
