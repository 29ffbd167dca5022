"""The ``cdlm`` command line. Each sub-command lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import sys

from cdlm import __version__

# Sub-command modules, in --help order. A module that is absent (an optional area not installed)
# is skipped so the rest of the CLI keeps working.
COMMAND_MODULES = [
    "cdlm.cli.models_cmd",
    "cdlm.cli.generate_cmd",
    "cdlm.cli.eval_cmd",
    "cdlm.cli.train_cmd",
    "cdlm.cli.distill_cmd",
    "cdlm.cli.rl_cmd",
]

# Errors that are the user's to fix: shown as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, ImportError)


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


def main(argv: list[str] | None = None) -> int:
    from cdlm.models.loading import offline_by_default

    offline_by_default()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
