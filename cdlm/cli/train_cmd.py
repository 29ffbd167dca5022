"""``cdlm train``: LoRA preference training (DPO, APO-zero, APO-down, CPO, SparsePO) on a preference dataset.

Settings come from, in increasing priority: built-in defaults, ``--config cfg.yaml`` (any
:class:`~cdlm.alignment.PreferenceConfig` field, plus ``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``, ``dataset``, ``split``), then explicit command-line flags. A run whose output folder already
holds ``checkpoint-*`` folders resumes from the last one (``--no-resume`` to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from cdlm.cli.common import add_model_arguments, load_from_args, progress

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
DATA_KEYS = ("dataset", "split", "eval_dataset", "eval_split")

# flag name -> PreferenceConfig field (None-valued flags are "not given")
CONFIG_FLAGS = {
    "beta": "beta",
    "learning_rate": "learning_rate",
    "max_steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_length": "max_length",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "seed": "seed",
    "cpo_alpha": "cpo_alpha",
    "sparsepo_mask_type": "sparsepo_mask_type",
    "sparsepo_activation": "sparsepo_activation",
    "sparsepo_mask_l1": "sparsepo_mask_l1",
    "on_invalid_pairs": "on_invalid_pairs",
}

DEFAULTS: dict[str, Any] = {
    "method": "dpo",
    "beta": 0.1,
    "learning_rate": 5e-5,
    "max_steps": 100,
    "per_device_train_batch_size": 4,
    "max_length": 512,
    "save_steps": 50,
    "logging_steps": 5,
    "lora_r": 16,
    "lora_alpha": None,  # 2 * r
    "lora_dropout": 0.0,
    "lora_target_modules": "all-linear",
    "dataset": None,  # the shipped HH-RLHF set
    "split": "train",
    "eval_dataset": None,
    "eval_split": "test",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="LoRA preference training: dpo, apo_zero, apo_down, cpo, sparsepo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--method", default=None, help="dpo, apo_zero, apo_down, cpo or sparsepo (default: dpo)")
    parser.add_argument("--dataset", default=None, help="preference .jsonl[.gz]/.json/.csv/.parquet file or hub id (default: the shipped HH-RLHF harmless set)")
    parser.add_argument("--split", default=None, help="split / `split` column value to train on (default: train)")
    parser.add_argument("--eval-dataset", default=None, help="held-out preference set, evaluated at the end (default: none; 'default' = the shipped test split)")
    parser.add_argument("--output-dir", required=True, help="where checkpoints and the final adapter go")
    parser.add_argument("--config", default=None, help="YAML file of PreferenceConfig fields and lora_* options")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per device per step")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None, help="max tokens of prompt + reply")
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--logging-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=None)
    parser.add_argument("--lora-alpha", type=int, default=None)
    parser.add_argument("--lora-dropout", type=float, default=None)
    parser.add_argument("--lora-target-modules", default=None, help="'all-linear' or comma-separated module names")
    parser.add_argument("--cpo-alpha", type=float, default=None)
    parser.add_argument("--sparsepo-mask-type", default=None, choices=["learned", "activation"])
    parser.add_argument("--sparsepo-activation", default=None, choices=["mlp", "attn", "residual", "logits"])
    parser.add_argument("--sparsepo-mask-l1", type=float, default=None)
    parser.add_argument("--on-invalid-pairs", default=None, choices=["drop", "error", "keep"])
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --output-dir")
    parser.set_defaults(func=run)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge defaults, the YAML config and explicit flags into one flat settings dict."""
    settings = dict(DEFAULTS)
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
        settings.update(loaded)
    for flag, key in CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            settings[key] = value
    for key in ("method", "dataset", "split", "eval_dataset", *LORA_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def build_config(settings: dict[str, Any], output_dir: str, use_bf16: bool):
    from cdlm.alignment.config import PreferenceConfig

    fields = {f.name for f in dataclasses.fields(PreferenceConfig)}
    unknown = sorted(set(settings) - fields - set(LORA_KEYS) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown} (see PreferenceConfig and the lora_* options)")
    kwargs = {k: v for k, v in settings.items() if k in fields}
    kwargs.setdefault("bf16", use_bf16)
    kwargs.setdefault("gradient_checkpointing", False)
    kwargs.setdefault("report_to", [])
    kwargs["output_dir"] = output_dir
    return PreferenceConfig(**kwargs)


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint

    from cdlm.alignment.data import load_preference_dataset
    from cdlm.alignment.trainer import PreferenceTrainer

    settings = resolve_settings(args)
    output_dir = Path(args.output_dir)
    # Validate the cheap things (method, beta, ...) before loading a model.
    config = build_config(settings, str(output_dir), use_bf16=False)
    train = load_preference_dataset(settings["dataset"], split=settings["split"])
    eval_dataset = None
    if settings.get("eval_dataset"):
        source = None if settings["eval_dataset"] == "default" else settings["eval_dataset"]
        eval_dataset = load_preference_dataset(source, split=settings.get("eval_split", "test"))
    progress(f"{config.method}: {len(train)} training pairs from {settings['dataset'] or 'the shipped HH-RLHF harmless set'}")

    loaded = load_from_args(args)
    on_gpu = next(loaded.model.parameters()).device.type == "cuda"
    if on_gpu and "bf16" not in settings and torch.cuda.is_bf16_supported():
        config = build_config({**settings, "bf16": True}, str(output_dir), use_bf16=True)
    targets = settings["lora_target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(
        r=int(settings["lora_r"]),
        lora_alpha=int(settings["lora_alpha"] or 2 * int(settings["lora_r"])),
        lora_dropout=float(settings["lora_dropout"]),
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    trainer = PreferenceTrainer(
        loaded.model,
        args=config,
        train_dataset=train,
        processing_class=loaded.tokenizer,
        peft_config=lora,
    )
    report = trainer.train_data_report
    if report is not None and report.invalid:
        progress(report.summary() + f" (on_invalid_pairs={config.on_invalid_pairs})")

    resume = None
    if output_dir.is_dir() and not args.no_resume:
        resume = get_last_checkpoint(str(output_dir))
        if resume:
            progress(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))
    progress(f"saved the {config.method} adapter to {output_dir}")
    if eval_dataset is not None:
        metrics = trainer.preference_metrics(eval_dataset)
        progress("held-out: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0
