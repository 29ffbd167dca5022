"""Loading and validating pairwise preference datasets (``prompt`` / ``chosen`` / ``rejected``).

Every preference trainer in :mod:`cdlm.alignment` (DPO, APO, CPO, SparsePO, DistiLLM-2) and reward-model training
consume the formats TRL's ``DPOTrainer`` accepts: "standard" (plain text) or "conversational" (lists of messages),
each with an explicit ``prompt`` column or with the prompt implicit in ``chosen``/``rejected`` (TRL's
:func:`trl.data_utils.maybe_extract_prompt` splits it off; :func:`with_explicit_prompt`). TRL's own preprocessing
silently drops pairs whose prompt fills ``max_length`` and happily trains on empty or identical replies,
which give no (or a degenerate) learning signal; :func:`validate_preference_dataset` finds those problems
first, counts them and either raises or drops them with a warning that says how many and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, DatasetDict, load_dataset
from pyarrow.lib import ArrowException
from trl.data_utils import is_conversational, maybe_extract_prompt

from cdlm.textio import MalformedRowError, read_jsonl_numbered

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("chosen", "rejected")
"""Columns every preference dataset needs; ``prompt`` is optional (implicit-prompt format, as in TRL)."""
DEFAULT_PREFERENCE_FILE = "hh_rlhf_harmless_small.jsonl.gz"
"""The small HH-RLHF harmless-base set shipped in ``cdlm/data/preferences`` (MIT; see its README)."""

OnInvalid = Literal["error", "drop", "keep"]


def default_preference_path() -> Path:
    """Path of the preference set shipped inside the package (works offline)."""
    return Path(str(resources.files("cdlm") / "data" / "preferences" / DEFAULT_PREFERENCE_FILE))


def _field_problem(value: Any) -> str | None:
    """Why ``value`` is not a preference field (text, or a list of ``{"role", "content"}`` messages), or None."""
    if isinstance(value, str) or value is None:
        return None
    if isinstance(value, list):
        for message in value:
            if not isinstance(message, dict) or not isinstance(message.get("content", ""), str):
                return "a list whose items are not {'role': ..., 'content': text} messages"
        return None
    return f"a {type(value).__name__}"


def check_preference_rows(rows: list[tuple[int, dict[str, Any]]], path: Path) -> None:
    """Refuse, naming ``file:LINE``, a row lacking a needed field or holding a field of the wrong type."""
    for number, row in rows:
        missing = [name for name in REQUIRED_COLUMNS if name not in row]
        if missing:
            raise MalformedRowError(f"{path}:{number} lacks {', '.join(map(repr, missing))} (has {sorted(row)})")
        for name in ("prompt", *REQUIRED_COLUMNS):
            problem = _field_problem(row.get(name))
            if problem is not None:
                raise MalformedRowError(
                    f"{path}:{number}: {name!r} must be text or a list of chat messages, not {problem}"
                )
        if "split" in row and not isinstance(row["split"], str):
            raise MalformedRowError(f"{path}:{number}: 'split' must be text, got {row['split']!r}")


def _select_split(
    rows: list[tuple[int, dict[str, Any]]], path: Path, split: str | None, where: str = "{path}:{number}"
) -> list[dict[str, Any]]:
    """The rows of ``split``; a file where only some rows name their split is refused (which would the rest be?)."""
    labelled = [number for number, row in rows if row.get("split") is not None]
    if split is None or not labelled:
        return [row for _, row in rows]
    if len(labelled) < len(rows):
        unlabelled = next(number for number, row in rows if row.get("split") is None)
        raise MalformedRowError(
            f"{where.format(path=path, number=unlabelled)} has no 'split' while {len(labelled)} of {len(rows)} "
            "rows have one: label every row, or none (then the whole file is used)"
        )
    chosen = [row for _, row in rows if row["split"] == split]
    if not chosen:
        found = sorted({row["split"] for _, row in rows})
        raise ValueError(f"preference file {path} has no rows with split={split!r} (its splits: {found})")
    return chosen


def load_preference_dataset(source: str | Path | None = None, split: str | None = "train") -> Dataset:
    """Load a preference dataset from the shipped set, a local file, or a Hugging Face hub id.

    Args:
        source: ``None`` for the shipped HH-RLHF set; a ``.jsonl``/``.jsonl.gz``/``.json``/``.csv``/``.parquet``
            file; or a hub dataset id (needs the network or a populated datasets cache).
        split: for the shipped set and files with a ``split`` column, the rows whose ``split`` equals this
            value (``None`` keeps all rows; a file where only some rows have a split is refused); for hub ids,
            the split to load.

    Returns:
        A :class:`datasets.Dataset`. JSON-lines rows are checked here (objects with text or message fields,
        errors name ``file:LINE``); the pairs themselves by :func:`validate_preference_dataset`.
    """
    if source is None:
        source = default_preference_path()
    path = Path(source)
    if path.exists():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")) or path.is_fifo() or path.is_char_device():
            numbered = read_jsonl_numbered(path, "preference file")
            if not numbered:
                raise ValueError(f"preference file {path} has no rows")
            check_preference_rows(numbered, path)
            rows = _select_split(numbered, path, split)
            try:
                return Dataset.from_list(rows)
            except (TypeError, ValueError, ArrowException) as error:  # e.g. a field that is text here, a list there
                raise MalformedRowError(
                    f"preference file {path}: its rows do not share one type per field ({error})"
                ) from None
        kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"unsupported preference file type {path.suffix!r} ({path}): use .jsonl[.gz], .json, .csv or .parquet"
            )
        try:
            loaded = load_dataset(kind, data_files=str(path), split="train")
        except Exception as error:  # datasets wraps parse errors (Arrow, pandas, json) in many types
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MalformedRowError(f"preference file {path} could not be read as {kind}: {reason}") from None
        if split is not None and "split" in loaded.column_names:
            numbered = list(enumerate(loaded, 1))
            keep = _select_split(numbered, path, split, where="{path} (row {number})")
            loaded = Dataset.from_list(keep) if len(keep) != len(loaded) else loaded
        return loaded
    if str(source).endswith((".jsonl", ".gz", ".json", ".csv", ".parquet")):
        raise FileNotFoundError(f"preference file not found: {source}")
    try:
        loaded = load_dataset(str(source), split=split or "train")
    except Exception as error:  # datasets raises many types for "not found / offline"
        raise ValueError(
            f"could not load preference dataset {source!r} as a file or hub dataset "
            f"({type(error).__name__}: {error}); "
            "offline, pass a local .jsonl file with prompt/chosen/rejected columns"
        ) from error
    if isinstance(loaded, DatasetDict):  # pragma: no cover - split=None on a hub id
        raise ValueError(f"{source!r} has several splits {list(loaded)}; pick one with split=")
    return loaded


def load_default_splits() -> tuple[Dataset, Dataset]:
    """The shipped set's fixed (train, held-out test) split: 500 and 100 pairs."""
    return load_preference_dataset(None, split="train"), load_preference_dataset(None, split="test")


def _text(value: Any) -> str:
    """The text of a standard field (str) or of a conversational field (list of messages)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            str(message.get("content", "")) if isinstance(message, dict) else str(message) for message in value
        )
    if value is None:
        return ""
    raise ValueError(f"preference fields must be strings or lists of messages, got {type(value).__name__}")


def _needs_prompt_extraction(row: dict[str, Any]) -> bool:
    """TRL's rule (``maybe_extract_prompt``): no ``prompt``, or a text prompt next to conversational replies."""
    if "prompt" not in row:
        return True
    return is_conversational({"chosen": row["chosen"]}) != is_conversational({"prompt": row["prompt"]})


def with_explicit_prompt(dataset: Dataset) -> Dataset:
    """The dataset with a ``prompt`` column, split off ``chosen``/``rejected`` by TRL's ``maybe_extract_prompt``.

    Datasets that already have a prompt of the replies' kind are returned unchanged. Rows whose ``chosen`` or
    ``rejected`` is empty get an empty prompt instead (TRL's extraction needs both), so that validation reports
    them as empty rather than crashing.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"preference dataset is missing column(s) {missing}; it has {dataset.column_names}. Expected "
            "chosen/rejected (and optionally prompt), standard text or conversational lists of messages."
        )
    if len(dataset) == 0 or not any(_needs_prompt_extraction(row) for row in dataset):
        return dataset

    drop = ["prompt"] if "prompt" in dataset.column_names else []
    return dataset.map(explicit_prompt_fields, remove_columns=drop, desc=None)


def explicit_prompt_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A row's ``prompt``/``chosen``/``rejected``; the prompt split off by TRL's ``maybe_extract_prompt`` if needed."""
    if not _needs_prompt_extraction(row):
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if not row["chosen"] or not row["rejected"]:
        empty = [] if is_conversational({"chosen": row["chosen"] or row["rejected"] or ""}) else ""
        return {"prompt": empty, "chosen": row["chosen"], "rejected": row["rejected"]}
    extracted = maybe_extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    return {"prompt": extracted["prompt"], "chosen": extracted["chosen"], "rejected": extracted["rejected"]}


@dataclass
class PreferenceDataReport:
    """What :func:`validate_preference_dataset` found, by problem, as row indices of the input dataset."""

    total: int
    empty_chosen: list[int] = field(default_factory=list)
    empty_rejected: list[int] = field(default_factory=list)
    identical: list[int] = field(default_factory=list)
    prompt_too_long: list[int] = field(default_factory=list)

    @property
    def invalid(self) -> set[int]:
        return set(self.empty_chosen) | set(self.empty_rejected) | set(self.identical) | set(self.prompt_too_long)

    @property
    def kept(self) -> int:
        return self.total - len(self.invalid)

    def summary(self) -> str:
        parts = [
            f"{len(rows)} {label}"
            for label, rows in (
                ("with empty chosen", self.empty_chosen),
                ("with empty rejected", self.empty_rejected),
                ("with identical chosen and rejected", self.identical),
                ("with a prompt that fills max_length (no completion token would remain)", self.prompt_too_long),
            )
            if rows
        ]
        return (
            f"{len(self.invalid)} of {self.total} preference pairs are unusable: " + "; ".join(parts)
            if parts
            else f"all {self.total} preference pairs are usable"
        )


def validate_preference_dataset(
    dataset: Dataset,
    *,
    tokenizer: Any | None = None,
    max_length: int | None = None,
    on_invalid: OnInvalid = "drop",
) -> tuple[Dataset, PreferenceDataReport]:
    """Check a preference dataset and deal with unusable pairs explicitly.

    Implicit-prompt datasets (only ``chosen``/``rejected``) first get their prompt split off by
    :func:`with_explicit_prompt`, so the returned dataset always has ``prompt``/``chosen``/``rejected``.

    Checks: the ``chosen`` and ``rejected`` columns exist (always a ``ValueError``); ``chosen`` or
    ``rejected`` empty after stripping; ``chosen`` identical to ``rejected`` (zero preference signal: the DPO
    gradient vanishes and SparsePO's masks see no contrast); and, given ``tokenizer`` and ``max_length``, prompts
    whose token count reaches ``max_length`` (TRL would drop them silently, since no completion token is left).

    Args:
        on_invalid: ``"error"`` raises a ``ValueError`` listing the counts; ``"drop"`` removes those rows and logs a
            warning with the counts; ``"keep"`` keeps them and logs the warning.

    Returns:
        The (possibly filtered) dataset and a :class:`PreferenceDataReport`.
    """
    if on_invalid not in ("error", "drop", "keep"):
        raise ValueError(f"on_invalid must be 'error', 'drop' or 'keep', got {on_invalid!r}")
    dataset = with_explicit_prompt(dataset)
    report = PreferenceDataReport(total=len(dataset))
    if len(dataset) == 0:
        raise ValueError("preference dataset is empty")
    check_length = tokenizer is not None and max_length is not None
    for index, row in enumerate(dataset):
        chosen, rejected = _text(row["chosen"]).strip(), _text(row["rejected"]).strip()
        if not chosen:
            report.empty_chosen.append(index)
        if not rejected:
            report.empty_rejected.append(index)
        if chosen and chosen == rejected:
            report.identical.append(index)
        if check_length:
            prompt = row["prompt"]
            if isinstance(prompt, list):
                ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
            if len(ids) >= max_length:
                report.prompt_too_long.append(index)
    if report.invalid:
        message = report.summary()
        if on_invalid == "error":
            raise ValueError(message + " (pass on_invalid='drop' to drop them)")
        if on_invalid == "drop":
            logger.warning("%s; dropping them, %d remain", message, report.kept)
            bad = report.invalid
            dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
            if len(dataset) == 0:
                raise ValueError(message + "; nothing left to train on")
        else:
            logger.warning("%s; keeping them as asked", message)
    return dataset, report
