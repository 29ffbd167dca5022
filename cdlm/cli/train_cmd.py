"""cdlm train: preference training (DPO, APO-zero, APO-down, CPO, SparsePO), LoRA by default.

Settings come from, in increasing priority: PreferenceConfig's defaults, --config cfg.yaml (any
PreferenceConfig or LoRA field, plus dataset, split, eval_dataset, eval_split), then the flags. A run
whose output folder holds checkpoint-* folders resumes from the last one, after checking it was made
with the same model, data and settings (--no-resume starts over).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from cdlm.cli.common import add_model_arguments, load_from_args, progress
from cdlm.cli.training import TrainingCommand


@dataclass
class PreferenceDataArguments:
    """Which preference pairs ``cdlm train`` reads."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "preference .jsonl[.gz]/.json/.csv/.parquet file or hub id (default: the shipped HH-RLHF set)"
        },
    )
    split: str = field(default="train", metadata={"help": "split (or `split` column value) to train on"})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "held-out preference set evaluated at the end; 'default': the shipped test split"},
    )
    eval_split: str = field(default="test", metadata={"help": "split of --eval-dataset"})


COMMAND = TrainingCommand(
    name="train",
    config_class="cdlm.alignment.preference.config:PreferenceConfig",
    config_fields=("beta", "max_length"),
    data_class=PreferenceDataArguments,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="preference training: dpo, apo_zero, apo_down, cpo, sparsepo (LoRA)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    COMMAND.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cdlm.alignment.callbacks import TrainingProgress
    from cdlm.alignment.preference.data import load_preference_dataset
    from cdlm.alignment.preference.trainer import PreferenceTrainer
    from cdlm.run_identity import rows_fingerprint

    # Everything cheap is validated before a model is loaded or anything is written.
    settings = COMMAND.resolve(args)
    config, lora, data = settings.config, settings.lora, settings.data
    train = load_preference_dataset(data.dataset, split=data.split)
    eval_dataset = None
    if data.eval_dataset:
        source = None if data.eval_dataset == "default" else data.eval_dataset
        eval_dataset = load_preference_dataset(source, split=data.eval_split)
    progress(f"{config.method}: {len(train)} training pairs from {data.dataset or 'the shipped HH-RLHF harmless set'}")

    loaded = load_from_args(args)
    resume = settings.prepare_output(args, loaded, data={"train": rows_fingerprint(train)})
    trainer = PreferenceTrainer(
        loaded.model,
        args=config,
        train_dataset=train,
        processing_class=loaded.tokenizer,
        peft_config=lora.peft_config(),
    )
    trainer.add_callback(TrainingProgress(f"{config.method} training"))
    report = trainer.train_data_report
    if report is not None and report.invalid:
        progress(report.summary() + f" (on_invalid_pairs={config.on_invalid_pairs})")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if config.push_to_hub:
        trainer.push_to_hub()
    progress(f"saved the {config.method} adapter to {config.output_dir}")
    if eval_dataset is not None:
        metrics = trainer.preference_metrics(eval_dataset)
        progress(
            "held-out: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        )
    return 0
