"""The task interface: what a task supplies so that ``evaluate`` can run it with any decoding method.

A task is one module under ``cdlm/eval_harness/tasks/`` (or anywhere, registered with
``register_task``) defining a ``Task`` subclass. Like an lm-evaluation-harness task it declares

* ``name`` and ``version`` (recorded in ``run.json`` and ``results.json``; bump the version whenever a
  change to prompts, parsing or metrics would change a score, so old runs are not resumed into new ones),
* ``output_type``: ``"loglikelihood"`` (every request is a context plus choices to score) or
  ``"generate_until"`` (every request is a prompt to continue),
* ``metrics`` (per-example values that ``aggregate`` averages, with their standard errors) and
  ``primary_metric`` (the one tables and comparisons lead with),

* ``options``: the task-specific settings it reads from ``EvalConfig.extra`` (``--task-option KEY=VALUE``),

and implements ``load`` (documents, the few-shot pool and a fingerprint of the data contents),
``build_requests`` (one request per document, built for the whole document list at once because few-shot
draws depend on the position), ``process_result`` (a document's response -> its per-example record) and,
for corpus-level metrics, ``aggregate``.

How a log-likelihood request is *scored* is not the task's business: the decoding method supplies the
rule (``DecodingMethod.scoring_rule()``), so the harness never switches on task or method names.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

# The scoring rule lives with the contrast rule (decoding sits below the harness); re-exported for tasks.
from cdlm.decoding.contrast import PLAIN_LOGLIKELIHOOD, ScoringRule  # noqa: F401

# Task modules fingerprint their rows with this (one home: cdlm.run_identity).
from cdlm.run_identity import rows_fingerprint as fingerprint_rows  # noqa: F401

if TYPE_CHECKING:
    from cdlm.eval_harness.evaluate import EvalConfig

LOGLIKELIHOOD = "loglikelihood"
GENERATE_UNTIL = "generate_until"
OUTPUT_TYPES = (LOGLIKELIHOOD, GENERATE_UNTIL)


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score each choice, written after ``context`` + ``target_delimiter`` (multiple choice).

    ``target_delimiter`` is lm-eval's (a space by default); with ``--apply-chat-template`` it becomes ""
    because the choice then starts the assistant turn, as in lm-eval. ``contrastive_context`` is the
    context that input-contrasting methods (``cid``) score the same continuations under; None when the
    task has no such input (such methods are then refused).
    """

    context: str
    choices: tuple[str, ...]
    target_delimiter: str = " "
    contrastive_context: str | None = None

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(self.target_delimiter + choice for choice in self.choices)


@dataclass(frozen=True)
class GenerationRequest:
    """Continue ``prompt`` until one of ``until`` (cut from the text) or the token budget.

    ``max_new_tokens`` None: ``EvalConfig.max_new_tokens``. ``contrastive_prompt`` feeds ``cid``.
    """

    prompt: str
    until: tuple[str, ...] = ()
    contrastive_prompt: str | None = None
    max_new_tokens: int | None = None


@dataclass
class LoglikelihoodResponse:
    """Per-continuation scores under the method's scoring rule and what they were computed from."""

    scores: list[float]
    expert_loglikelihoods: list[float]
    contrast_loglikelihoods: list[float] | None
    is_greedy: list[bool]
    num_tokens: list[int]


@dataclass
class GenerationResponse:
    text: str
    num_tokens: int


@dataclass
class TaskData:
    """Documents to evaluate (already limited), the few-shot pool, and where they came from.

    ``fingerprints`` maps a data role (``"data"``, ``"fewshot_data"``) to a hash of the *contents* of
    all its rows (before ``limit``), so a resumed run notices a changed file even at the same path.
    """

    docs: list[dict]
    source: str
    fewshot_pool: list[dict] | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)


class Task(ABC):
    """One evaluation task (see the module docstring for the contract)."""

    name: ClassVar[str]
    version: ClassVar[str]
    output_type: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    default_num_fewshot: ClassVar[int] = 0
    # Keys the task reads from ``EvalConfig.extra`` (``cdlm eval --task-option KEY=VALUE``); others are refused.
    options: ClassVar[tuple[str, ...]] = ()

    def num_fewshot(self, config: EvalConfig) -> int:
        return self.default_num_fewshot if config.num_fewshot is None else config.num_fewshot

    @abstractmethod
    def load(self, config: EvalConfig) -> TaskData:
        """Read and validate the documents (raise ``MalformedRowError`` naming file, row and field)."""

    @abstractmethod
    def build_requests(
        self, data: TaskData, config: EvalConfig
    ) -> list[LoglikelihoodRequest] | list[GenerationRequest]:
        """One request per document of ``data.docs``, in order. Raise ``ValueError`` for impossible settings
        (e.g. more few-shot exemplars than the pool holds) *here*: it runs before anything is written."""

    @abstractmethod
    def process_result(self, doc: dict, request, response) -> dict:
        """The per-example record: every name in ``metrics`` plus whatever helps reading the outputs."""

    def aggregate(self, records: Sequence[dict]) -> dict[str, float]:
        """Corpus-level results: mean and standard error of each metric (lm-eval's ``mean`` + ``mean_stderr``),
        keyed ``name`` / ``name_stderr`` (``exact_match,strict-match`` -> ``exact_match_stderr,strict-match``)."""
        from cdlm.eval_harness.metrics import mean_and_stderr, stderr_key

        results = {}
        for name in self.metrics:
            mean, stderr = mean_and_stderr([float(r[name]) for r in records])
            results[name] = mean
            results[stderr_key(name)] = stderr
        return results

    def describe(self) -> dict:
        """What identifies the task in results files and run signatures."""
        return {"name": self.name, "version": self.version, "output_type": self.output_type}


# name -> "module:Class"; imported lazily so listing tasks costs nothing and optional tasks stay optional.
_TASKS: dict[str, str] = {
    "gsm8k": "cdlm.eval_harness.tasks.gsm8k:GSM8KTask",
    "gsm8k_cot": "cdlm.eval_harness.tasks.gsm8k_cot:GSM8KChainOfThoughtTask",
    "hellaswag": "cdlm.eval_harness.tasks.hellaswag:HellaSwagTask",
    "openended": "cdlm.eval_harness.openended:OpenEndedTask",
}


def register_task(name: str, target: str | type[Task]) -> None:
    """Add a task: ``register_task("mytask", "mypackage.mytask:MyTask")`` or the class itself."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    _TASKS[name] = target


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def get_task(name: str) -> Task:
    """A fresh instance of task ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        target = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(_TASKS)}") from None
    module_name, class_name = target.split(":")
    task_class = getattr(importlib.import_module(module_name), class_name)
    if task_class.output_type not in OUTPUT_TYPES:
        raise TypeError(f"task {name!r} declares output_type {task_class.output_type!r}; use one of {OUTPUT_TYPES}")
    return task_class()
