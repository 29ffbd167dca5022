"""What ``cdlm train``, ``cdlm distill train`` and ``cdlm rl`` share: flags generated from their config
dataclass plus :class:`~cdlm.alignment.lora.LoraArguments` and a data dataclass, one YAML loader, the
same settings precedence (config defaults < ``--config`` YAML < flags), the same checks before anything
is loaded, and the same resume rule.

Resume: a run writes ``cdlm_run.json`` (the model's weights fingerprint, a content hash of every row the
training reads, and every setting that changes the computation; never a credential such as ``hub_token``)
into its output folder. Rerun into that folder, it resumes from the last complete checkpoint only if those
match; otherwise it stops and names what changed. Settings that only extend or observe a run
(``max_steps``, logging, saving, reporting) may change between the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdlm.cli.common import is_main_process
from cdlm.cli.config_args import (
    COMMON_TRAINING_FIELDS,
    FieldSpec,
    add_field_arguments,
    cached_field_specs,
    check_setting_values,
    field_specs,
    given_settings,
    load_yaml_settings,
    split_settings,
)

RUN_FILE = "cdlm_run.json"

# Settings a resumed run may change: they extend the run or change what is logged and saved, not what is computed.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "num_train_epochs",
        "num_iterations",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "run_name",
        "push_to_hub",
        "hub_model_id",
        "per_device_eval_batch_size",
        "eval_dataset",
        "eval_split",
    }
)

# Integrations of `report_to` and the package each needs (the `cdlm[tensorboard]` extra brings tensorboard).
_INTEGRATION_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


@dataclass
class ResolvedSettings:
    """The validated dataclasses of one command line, and what identifies the run."""

    config: Any
    lora: Any
    data: Any
    given: dict[str, Any]

    def prepare_output(self, args: argparse.Namespace, loaded, data: dict[str, Any]) -> str | None:
        """Check or record the run's identity in its output folder; the checkpoint to resume from, or None.

        ``data``: a content fingerprint (:func:`~cdlm.run_identity.rows_fingerprint`) of every row set the
        training computation reads, by role, so the same path holding other rows is refused on resume.
        """
        from cdlm.alignment.checkpoints import last_complete_checkpoint
        from cdlm.alignment.settings import without_secrets
        from cdlm.cli.common import progress
        from cdlm.run_identity import check_same_run, weights_fingerprint

        output = Path(self.config.output_dir)
        identity = {
            "model": getattr(loaded, "reference", None),
            "weights": weights_fingerprint(loaded.model),
            "data": dict(data),
            "settings": without_secrets({k: v for k, v in self.given.items() if k not in RESUMABLE_CHANGES}),
        }
        run_file = output / RUN_FILE
        found = last_complete_checkpoint(output, report=progress, set_aside=is_main_process())
        checkpoint = str(found) if found is not None else None
        if checkpoint and not args.no_resume:
            if run_file.is_file():
                recorded = json.loads(run_file.read_text())
                check_same_run(recorded, identity, folder=str(output), restart_hint="pass --no-resume to start over")
            else:
                raise ValueError(
                    f"{output} holds checkpoints but no {RUN_FILE}, so cdlm cannot check that resuming continues "
                    "the same run; pass --no-resume to start over or choose another --output-dir"
                )
        else:
            checkpoint = None
        if is_main_process():
            output.mkdir(parents=True, exist_ok=True)
            temporary = run_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(identity, indent=2, sort_keys=True, default=str) + "\n")
            temporary.replace(run_file)
        if checkpoint:
            progress(f"resuming from {checkpoint}")
        return checkpoint


@dataclass
class TrainingCommand:
    """The generated part of one trainer command."""

    name: str
    config_class: str  # "module:Class", imported only to build the config (its field specs are cached)
    config_fields: tuple[str, ...] = ()  # inherited fields offered as flags beyond COMMON_TRAINING_FIELDS
    data_class: type | None = None
    unused_fields: tuple[str, ...] = ()  # common fields this trainer ignores: no flag (a flag must do something)

    def _specs(self) -> list[tuple[str, list[FieldSpec]]]:
        from cdlm.alignment.lora import LoraArguments

        class_name = self.config_class.partition(":")[2]
        common = tuple(name for name in COMMON_TRAINING_FIELDS if name not in self.unused_fields)
        groups = [(class_name, cached_field_specs(self.config_class, common + self.config_fields))]
        groups.append(("LoRA", field_specs(LoraArguments)))
        if self.data_class is not None:
            groups.append(("data", field_specs(self.data_class)))
        return groups

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        run = parser.add_argument_group("run")
        run.add_argument("--output-dir", required=True, help="where checkpoints, the run record and the result go")
        run.add_argument("--config", default=None, help="YAML file of settings (field names as keys); flags win")
        run.add_argument("--no-resume", action="store_true", help="start over even if --output-dir holds checkpoints")
        for title, specs in self._specs():
            add_field_arguments(parser, specs, title)

    def resolve(self, args: argparse.Namespace, **overrides: Any) -> ResolvedSettings:
        """Validated config, LoRA and data dataclasses; raises ``ValueError`` naming the first bad setting."""
        from cdlm.alignment.lora import LoraArguments

        module, _, class_name = self.config_class.partition(":")
        config_class = getattr(importlib.import_module(module), class_name)
        classes = [c for c in (self.data_class, LoraArguments, config_class) if c is not None]
        settings = load_yaml_settings(args.config) if args.config else {}
        for _, specs in self._specs():
            settings.update(given_settings(args, specs))
        settings.update(overrides)
        check_setting_values(settings, [spec for _, specs in self._specs() for spec in specs])
        _check_deepspeed()
        parts = dict(zip(classes, split_settings(settings, *classes)))
        config_kwargs = {**_machine_defaults(config_class, parts[config_class]), **parts[config_class]}
        _check_budget(config_kwargs)
        _check_integrations(config_kwargs)
        config = config_class(output_dir=args.output_dir, **config_kwargs)
        lora = LoraArguments(**parts[LoraArguments])
        data = self.data_class(**parts[self.data_class]) if self.data_class is not None else None
        return ResolvedSettings(config=config, lora=lora, data=data, given=settings)


def _machine_defaults(config_class: type, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults that depend on the machine: no pinned memory (and its warning) without an accelerator."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    defaults: dict[str, Any] = {}
    if "dataloader_pin_memory" in fields and "dataloader_pin_memory" not in given:
        import torch

        defaults["dataloader_pin_memory"] = torch.cuda.is_available()
    return defaults


def _check_budget(config: dict[str, Any]) -> None:
    """``max_steps=0`` would still run a step and save a model: refuse it, as any non-positive budget."""
    max_steps = config.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or -1 to train num_train_epochs epochs), got {max_steps}")
    epochs = config.get("num_train_epochs")
    if (max_steps is None or max_steps == -1) and epochs is not None and not epochs > 0:
        raise ValueError(f"num_train_epochs must be > 0, got {epochs}")
    iterations = config.get("num_iterations")
    if iterations is not None and iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {iterations}")


def _check_deepspeed() -> None:
    """``accelerate launch`` with a DeepSpeed/FSDP config this machine cannot run: say so before any work."""
    from cdlm.alignment.parallel import requested_sharding, sharding_problem
    from cdlm.errors import MissingDependencyError

    problem = sharding_problem(requested_sharding())
    if problem:
        raise MissingDependencyError(problem)


def _check_integrations(config: dict[str, Any]) -> None:
    """Fail before training on what would fail after it: missing logger packages, pushing while offline."""
    from cdlm.errors import MissingDependencyError

    report_to = config.get("report_to") or []
    for integration in [report_to] if isinstance(report_to, str) else report_to:
        package = _INTEGRATION_PACKAGES.get(integration)
        if package and importlib.util.find_spec(package) is None:
            extra = f"pip install 'cdlm[{integration}]'" if integration == "tensorboard" else f"pip install {package}"
            raise MissingDependencyError(f"report_to={integration!r} needs the {package} package: {extra}")
    if config.get("push_to_hub") and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ValueError(
            "push_to_hub needs the Hugging Face Hub, but this run is offline (HF_HUB_OFFLINE is set); "
            "drop --push-to-hub or run with HF_HUB_OFFLINE=0 and a token"
        )
