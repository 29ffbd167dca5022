"""``cdlm doctor``: what this environment can run, checked before the long or launched work that needs it.

``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m cdlm train ...`` without
DeepSpeed fails inside accelerate's launcher with a traceback, before cdlm runs; ``cdlm doctor
--accelerate-config FILE`` applies the trainers' own rule to that file first and says what is missing in
one line (exit 2). Without options it lists the versions, the registered models and the optional
features with the command that installs each.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys

# feature -> (module to find, how to get it)
OPTIONAL = {
    "vLLM backend and `cdlm serve`": ("vllm", "bash scripts/setup_vllm.sh (its own venv)"),
    "lm-eval model (`cdlm-lm-eval`)": ("lm_eval", "pip install 'cdlm[lmeval]'"),
    "MAUVE for --task openended": ("mauve", "pip install 'cdlm[eval]'"),
    "plots in `cdlm compare`": ("matplotlib", "pip install 'cdlm[plot]'"),
    "DeepSpeed configs": ("deepspeed", "pip install deepspeed (CUDA GPUs)"),
    "report_to: tensorboard": ("tensorboard", "pip install 'cdlm[tensorboard]'"),
}
CORE = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
# accelerate's distributed_type -> the name cdlm.alignment.parallel uses
SHARDING = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="what this environment can run (versions, models, optional features, an accelerate config)",
        description=__doc__.split("\n\n")[1].replace("``", "`"),
    )
    parser.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="check that `accelerate launch --config_file FILE ... -m cdlm ...` can run here (exit 2 if not)",
    )
    parser.set_defaults(func=run)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def accelerate_config_problem(path: str) -> str | None:
    """Why ``accelerate launch`` with the config at ``path`` cannot run cdlm here, or None."""
    import yaml

    from cdlm.alignment.parallel import sharding_problem
    from cdlm.textio import read_bytes

    try:
        config = yaml.safe_load(read_bytes(path, "--accelerate-config").decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"--accelerate-config {path} is not a YAML file ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--accelerate-config {path} is not an accelerate config (a YAML mapping)")
    return sharding_problem(SHARDING.get(str(config.get("distributed_type", "NO")).upper()))


def run(args: argparse.Namespace) -> int:
    if args.accelerate_config:
        problem = accelerate_config_problem(args.accelerate_config)
        if problem:
            print(f"cdlm doctor: {args.accelerate_config}: {problem}", file=sys.stderr)
            return 2
        print(f"{args.accelerate_config}: can run here")
        return 0
    from cdlm.cli.common import default_threads
    from cdlm.models.registry import REGISTRY

    print(f"python {sys.version.split()[0]}; " + ", ".join(f"{name} {_version(name)}" for name in CORE))
    threads, why = default_threads()
    print(f"torch threads: {threads} ({why})")
    for name, model in REGISTRY.items():
        state = "installed" if model.is_installed() else f"missing: cdlm models install {name}"
        print(f"model {name}: {state}")
    for feature, (module, how) in OPTIONAL.items():
        found = importlib.util.find_spec(module) is not None
        print(f"{feature}: {'yes' if found else 'no; ' + how}")
    return 0
