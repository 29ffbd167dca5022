"""``cdlm serve``: vLLM's OpenAI-compatible server with cdlm's contrastive logits processor loaded.

A thin front for ``vllm serve``: it resolves a cdlm model reference (registered name, GGUF file,
folder) to the safetensors folder vLLM can load, adds ``--logits-processors
cdlm.decoding.vllm.processors:ContrastiveLogitsProcessor`` (vLLM's documented way to load a custom
logits processor by its fully qualified name), turns async scheduling off (the processor needs each
step's real token ids), and, with ``--early-exit-layers``, serves the expert through cdlm's
early-exit model class (``cdlm.decoding.vllm.early_exit``). ``--vllm-args '...'`` passes more
arguments to vLLM's server unchanged. Requests switch contrast on with flat ``cdlm_*`` keys in ``vllm_xargs``::

    cdlm serve smollm2-135m-instruct --early-exit-layers 8 --port 8000
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "smollm2-135m-instruct",
      "prompt": "Why is the sky blue?", "max_tokens": 32, "temperature": 0,
      "vllm_xargs": {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8", "cdlm_beta": 0.5}}'

Invalid settings are rejected with HTTP 400 naming the problem. Binds 127.0.0.1 unless ``--host``
says otherwise. Imports nothing heavy until it runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from cdlm.cli.config_args import plain_description

PROCESSOR = "cdlm.decoding.vllm.processors:ContrastiveLogitsProcessor"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server with contrastive decoding (needs the vLLM venv)",
        description=plain_description(__doc__.split("\n\n")[1]),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m-instruct",
        help="cdlm model reference: registered name, GGUF file, folder (default: %(default)s)",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside a multi-file reference")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--early-exit-layers",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="capture these layers inside the engine: 'early-exit:N' amateurs then cost one norm + head",
    )
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto: float32 on CPU, as cdlm's loaders)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=1, help="vLLM-CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--print-command", action="store_true", help="print the vllm serve command and exit")
    parser.add_argument(
        "--vllm-args",
        default="",
        metavar="'ARGS'",
        help="more arguments for vLLM's server, one quoted string (e.g. '--generation-config vllm')",
    )
    parser.set_defaults(func=run)


def vllm_serve_argv(args: argparse.Namespace) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for ``args`` (run with this Python)."""
    import json

    from cdlm.decoding.vllm.backend import resolve_served_folder, served_architecture, vllm_dtype

    for flag in ("tensor_parallel_size", "data_parallel_size", "max_num_seqs", "max_model_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    folder = resolve_served_folder(args.model, args.gguf_file)
    dtype = vllm_dtype(args.dtype)
    # vLLM's API-server module rather than the ``vllm serve`` entry point: the latter reads the version
    # of a distribution named "vllm", which the CPU build (distribution "vllm-cpu") does not have.
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--served-model-name",
        args.served_model_name or args.model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--data-parallel-size",
        str(args.data_parallel_size),
        "--logits-processors",
        PROCESSOR,
        "--no-async-scheduling",
        "--enforce-eager",
    ]
    if args.early_exit_layers:
        from cdlm.decoding.vllm.early_exit import engine_overrides

        overrides = engine_overrides(served_architecture(folder), args.early_exit_layers)
        argv += ["--hf-overrides", json.dumps(overrides)]
    return argv + shlex.split(args.vllm_args)


def run(args: argparse.Namespace) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "cdlm serve needs vLLM: bash scripts/setup_vllm.sh, then .venv-vllm/bin/cdlm serve"
        ) from error
    argv = vllm_serve_argv(args)
    if args.print_command:
        print(shlex.join(argv))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_cache_gib))
    sys.stdout.flush()
    os.execv(argv[0], argv)  # the server owns the process: signals and exit codes are vLLM's
    return 0  # pragma: no cover - execv does not return
