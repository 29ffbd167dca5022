"""``cdlm serve``: vLLM's OpenAI-compatible server with cdlm's contrastive logits processor loaded.

A thin front for ``vllm serve``: it resolves a cdlm model reference (registered name, GGUF file,
folder) to the safetensors folder vLLM can load, adds ``--logits-processors
cdlm.decoding.vllm.processors:ContrastiveLogitsProcessor`` (vLLM's documented way to load a custom
logits processor by its fully qualified name), turns async scheduling off (the processor needs each
step's real token ids), and, with ``--early-exit-layers``, serves the expert through cdlm's
early-exit model class (``cdlm.decoding.vllm.early_exit``). ``--vllm-args '...'`` passes more
arguments to vLLM's server unchanged. Requests switch contrast on with flat ``cdlm_*`` keys in ``vllm_xargs``
(on ``/v1/chat/completions``, which applies the model's chat template, and ``/v1/completions``)::

    cdlm serve smollm2-135m-instruct --early-exit-layers 8 --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
      "model": "smollm2-135m-instruct", "max_tokens": 64, "temperature": 0,
      "messages": [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}],
      "vllm_xargs": {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8"}}'

A raw ``/v1/completions`` prompt to an instruct model often ends at once: the expert itself ranks EOS
first, and the default EOS rule (``cdlm_eos_promotion: "forbid"``) keeps EOS exactly where the expert
ranks it first (it only stops the contrast from *promoting* EOS); ``"allow"`` is the papers' rule.

Every ``cdlm_*`` setting is checked when the request arrives, against the served model (layers,
vocabulary, ``--max-model-len``, amateurs that exist and share its tokenizer, bounded numbers): a bad
one gets HTTP 400 naming it, and a request that still fails inside the engine is ended alone, so no
request stops the server. Binds 127.0.0.1 unless ``--host`` says otherwise. Imports nothing heavy
until it runs.
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


# vLLM flags cdlm serve sets itself (requests are checked against these values): not in --vllm-args.
OWN_FLAGS = {
    "--model": "MODEL",
    "--served-model-name": "--served-model-name",
    "--host": "--host",
    "--port": "--port",
    "--dtype": "--dtype",
    "--max-model-len": "--max-model-len",
    "--max-num-seqs": "--max-num-seqs",
    "--tensor-parallel-size": "--tensor-parallel-size",
    "--data-parallel-size": "--data-parallel-size",
    "--logits-processors": "(always cdlm's processor)",
    "--hf-overrides": "--early-exit-layers",
    "--async-scheduling": "(always off: the processor needs each step's token ids)",
}


def _check_vllm_args(vllm_args: list[str]) -> None:
    for item in vllm_args:
        flag = item.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise ValueError(f"--vllm-args: {flag} is set by cdlm serve; use {OWN_FLAGS[flag]} instead")


def served_model(args: argparse.Namespace, folder: str):
    """What the server's requests are checked against (``cdlm.decoding.vllm.served``)."""
    from cdlm.decoding.vllm.served import ServedModel

    return ServedModel(folder, args.max_model_len, tuple(sorted(set(args.early_exit_layers))))


def vllm_serve_argv(args: argparse.Namespace) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for ``args`` (run with this Python)."""
    import json

    from cdlm.decoding.vllm.backend import vllm_dtype
    from cdlm.decoding.vllm.served import resolve_served_folder, served_architecture

    for flag in ("tensor_parallel_size", "data_parallel_size", "max_num_seqs", "max_model_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    extra = shlex.split(args.vllm_args)
    _check_vllm_args(extra)
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
    return argv + extra


def run(args: argparse.Namespace) -> int:
    from cdlm.decoding.vllm.backend import require_vllm
    from cdlm.decoding.vllm.served import SERVED_ENV

    require_vllm("cdlm serve")  # one line naming scripts/setup_vllm.sh when vLLM is missing
    argv = vllm_serve_argv(args)
    if args.print_command:
        print(shlex.join(argv))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_cache_gib))
    os.environ[SERVED_ENV] = served_model(args, argv[argv.index("--model") + 1]).to_env()
    sys.stdout.flush()
    os.execv(argv[0], argv)  # the server owns the process: signals and exit codes are vLLM's
    return 0  # pragma: no cover - execv does not return
