"""Command-line flags generated from the trainers' config dataclasses, and the one YAML settings loader.

Every setting has one name everywhere: the config field ``gradient_accumulation_steps`` is the flag
``--gradient-accumulation-steps`` in ``cdlm train``, ``cdlm distill train`` and ``cdlm rl``, and the key
``gradient_accumulation_steps`` in a ``--config`` YAML file. Defaults come from the dataclass alone.

Values are checked before anything runs (:func:`check_setting_values`): the kind a field declares (a YAML
value too), finite numbers, and the ranges of :data:`cdlm.alignment.settings.RANGES`, naming the flag.

Which fields become flags: those a cdlm config declares itself, plus ``COMMON_TRAINING_FIELDS`` of
``TrainingArguments``. Every other field of the config is still accepted from the YAML file.

Building the flags means importing the config (TRL, transformers: seconds), which would make
``cdlm train --help`` slow. The field specs are therefore cached as JSON under ``$CDLM_CACHE/cli``,
keyed by the config modules' source and the installed transformers/TRL/PEFT versions, so they are
recomputed exactly when a field could have changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

# TrainingArguments fields offered as flags by every trainer command (the rest: --config YAML).
COMMON_TRAINING_FIELDS = (
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "seed",
    "bf16",
    "gradient_checkpointing",
    "report_to",
    "run_name",
    "push_to_hub",
    "hub_model_id",
)

# Fields the command sets itself (output_dir is a required flag of its own).
_NOT_FLAGS = {"output_dir"}

_SPEC_VERSION = 1
_PACKAGES = ("transformers", "trl", "peft")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What argparse needs to know about one config field, JSON-serialisable for the cache."""

    name: str
    kind: str  # "bool", "int", "float", "str"
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    multiple: bool = False  # list-valued: nargs="+"
    optional: bool = False  # None is a valid value ("none" on the command line)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def plain_help(text: str) -> str:
    """Help text without reStructuredText/Markdown markup (``x``, :class:`~a.B`, `y`)."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
    text = text.replace("``", "").replace("`", "")
    return " ".join(text.split()).replace("%", "%%")


def plain_description(text: str) -> str:
    """A docstring as a command's --help description: markup removed, line breaks kept."""
    lines = [plain_help(line).replace("%%", "%") if line.strip() else "" for line in text.strip().splitlines()]
    return "\n".join(line[:-1] if line.endswith("::") else line for line in lines).replace("%", "%%")


def _kind(annotation: Any) -> tuple[str, tuple[str, ...] | None, bool, bool] | None:
    """(kind, choices, multiple, optional) for a type annotation, or None when it has no flag form."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        lists = [a for a in members if typing.get_origin(a) is list]
        if lists:  # e.g. report_to: None | str | list[str]
            annotation = lists[0]
        else:
            enums = [a for a in members if isinstance(a, type) and issubclass(a, enum.Enum)]
            annotation = enums[0] if enums else members[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (str,)
        described = _kind(item)
        return None if described is None or described[2] else (described[0], described[1], True, optional)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "str", tuple(str(member.value) for member in annotation), False, optional
    for kind in (bool, int, float, str):
        if annotation is kind:
            return kind.__name__, None, False, optional
    return None


def field_specs(config_class: type, names: tuple[str, ...] | None = None) -> list[FieldSpec]:
    """Specs of ``config_class``'s own fields (those not inherited) plus ``names`` of inherited ones."""
    hints = typing.get_type_hints(config_class)
    inherited: set[str] = set()
    for base in config_class.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            inherited |= {f.name for f in dataclasses.fields(base)}
    wanted = set(names or ())
    specs = []
    for item in dataclasses.fields(config_class):
        if item.name in _NOT_FLAGS or not item.init or (item.name in inherited and item.name not in wanted):
            continue
        described = _kind(hints[item.name])
        if described is None:
            continue
        kind, choices, multiple, optional = described
        choices = tuple(item.metadata.get("choices") or ()) or choices
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = None
        if isinstance(default, enum.Enum):
            default = default.value
        specs.append(
            FieldSpec(item.name, kind, default, plain_help(item.metadata.get("help", "")), choices, multiple, optional)
        )
    return specs


def _cache_key(class_path: str, names: tuple[str, ...]) -> str:
    """Changes whenever a spec could: cdlm's config module source, the versions of the packages it builds on."""
    digest = hashlib.sha256(f"{_SPEC_VERSION}|{class_path}|{names}".encode())
    module = class_path.partition(":")[0]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find module {module!r}")
    digest.update(Path(spec.origin).read_bytes())
    for package in _PACKAGES:
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=absent".encode())
    return digest.hexdigest()[:24]


def cached_field_specs(class_path: str, names: tuple[str, ...] = ()) -> list[FieldSpec]:
    """:func:`field_specs` of ``"module:Class"``, from the JSON cache when it is current (no heavy imports)."""
    from cdlm.models.cache import cache_root

    path = cache_root() / "cli" / f"{class_path.replace(':', '.')}-{_cache_key(class_path, names)}.json"
    try:
        rows = json.loads(path.read_text())
        return [FieldSpec(**{**row, "choices": tuple(row["choices"]) if row["choices"] else None}) for row in rows]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    module, _, class_name = class_path.partition(":")
    specs = field_specs(getattr(importlib.import_module(module), class_name), names)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{id(specs)}.tmp")
        temporary.write_text(json.dumps([dataclasses.asdict(spec) for spec in specs]))
        temporary.replace(path)
    except OSError:
        pass  # a read-only cache only costs speed
    return specs


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_field_arguments(parser: argparse.ArgumentParser, specs: list[FieldSpec], title: str) -> None:
    """One flag per spec; absent flags leave no attribute (``SUPPRESS``), so "not given" is visible."""
    group = parser.add_argument_group(title)
    for spec in specs:
        default = "none" if spec.default is None else spec.default
        help_text = f"{spec.help} (default: {default})" if spec.help else f"(default: {default})"
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        if spec.kind == "bool" and not spec.multiple:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            convert = {"int": int, "float": float, "str": str}[spec.kind]
            kwargs["type"] = _none_or(convert) if spec.optional else convert
            if spec.choices:
                kwargs["choices"] = list(spec.choices) + (["none"] if spec.optional else [])
                kwargs["type"] = str
            if spec.multiple:
                kwargs["nargs"] = "+"
        group.add_argument(spec.flag, **kwargs)


def load_yaml_settings(path: str | Path) -> dict[str, Any]:
    """The settings of a ``--config`` file: one YAML mapping of field names to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def given_settings(args: argparse.Namespace, specs: list[FieldSpec]) -> dict[str, Any]:
    """The spec'd settings the command line gave explicitly ("none" already turned into None)."""
    settings = {}
    for spec in specs:
        if hasattr(args, spec.name):
            value = getattr(args, spec.name)
            settings[spec.name] = None if spec.optional and value == "none" else value
    return settings


def check_setting_values(settings: dict[str, Any], specs: list[FieldSpec]) -> None:
    """Refuse, naming the flag, a non-finite or out-of-range number or a value of the wrong kind (YAML)."""
    from cdlm.alignment.settings import check_value

    by_name = {spec.name: spec for spec in specs}
    for name, value in settings.items():
        spec = by_name.get(name)
        shown = spec.flag if spec is not None else name
        if spec is not None and value is not None and not spec.multiple:
            expected = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}[spec.kind]
            if not isinstance(value, expected) or (spec.kind != "bool" and isinstance(value, bool)):
                raise ValueError(f"{shown} must be a{'n' if spec.kind == 'int' else ''} {spec.kind}, got {value!r}")
        check_value(name, value, shown)


def split_settings(settings: dict[str, Any], *config_classes: type) -> list[dict[str, Any]]:
    """Settings per config class (a name goes to the first class that has it); unknown names are an error."""
    parts: list[dict[str, Any]] = [{} for _ in config_classes]
    unknown = []
    for name, value in settings.items():
        for part, config_class in zip(parts, config_classes):
            if name in {f.name for f in dataclasses.fields(config_class)}:
                part[name] = value
                break
        else:
            unknown.append(name)
    if unknown:
        known = " / ".join(c.__name__ for c in config_classes)
        raise ValueError(f"unknown setting(s) {sorted(unknown)}: not a field of {known}")
    return parts
