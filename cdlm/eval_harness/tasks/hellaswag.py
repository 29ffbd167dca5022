"""HellaSwag as lm-eval 0.4.x renders it: ``activity_label: ctx_a Ctx_b`` query, " ending" choices.

``process_doc`` is lm-eval's ``hellaswag/utils.py`` logic (WikiHow ``[title]`` becomes ". ", other
``[...]`` markers are dropped, double spaces collapsed). Rows that are already rendered (``query``,
``choices``, ``gold``: the packaged ``validation_olmo1000`` file, or a user's preprocessed file) are
used as they are.

Few-shot (optional; lm-eval's hellaswag is zero-shot by default) draws exemplars from the other
validation rows with ``random.Random(1234)``, because the train split is not shipped; the query is
then ``exemplar query + " " + gold choice`` blocks joined by a blank line before the real query.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from cdlm.eval_harness.data import MalformedRowError, load_rows, row_name, take, validate_rows
from cdlm.eval_harness.metrics import multiple_choice_predictions
from cdlm.eval_harness.task import (
    LOGLIKELIHOOD,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    Task,
    TaskData,
    fingerprint_rows,
)

RAW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "activity_label": str,
    "ctx_a": str,
    "ctx_b": str,
    "endings": list,
    "label": (int, str),
}
PROCESSED_FIELDS: dict[str, type | tuple[type, ...]] = {"query": str, "choices": list, "gold": (int, str)}


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _gold(value, name: str, field: str) -> int:
    """The label as an int; ``"2"`` is fine (the hub's HellaSwag stores strings), ``"two"`` or ``2.5`` is not."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise MalformedRowError(f"{name} field {field!r} should be an integer label, got {value!r}")
    return int(value)


def process_doc(row: dict, name: str = "<row>") -> dict:
    """One raw HellaSwag row as a query/choices/gold doc; ``name`` is how errors name the row."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": preprocess(row["activity_label"] + ": " + context),
        "choices": [preprocess(ending) for ending in row["endings"]],
        "gold": _gold(row["label"], name, "label"),
    }


def process_rows(rows: Sequence[dict], where: str) -> list[dict]:
    """Validate and render rows (raw HellaSwag or already processed) into query/choices/gold docs."""
    if rows and "query" in rows[0]:
        validate_rows(rows, PROCESSED_FIELDS, where)
        docs = [
            {
                "query": r["query"],
                "choices": list(r["choices"]),
                "gold": _gold(r["gold"], row_name(rows, i, where), "gold"),
            }
            for i, r in enumerate(rows)
        ]
    else:
        validate_rows(rows, RAW_FIELDS, where)
        docs = [process_doc(r, row_name(rows, i, where)) for i, r in enumerate(rows)]
    for index, doc in enumerate(docs):
        name = row_name(rows, index, where)
        if len(doc["choices"]) < 2 or not all(isinstance(c, str) for c in doc["choices"]):
            raise MalformedRowError(f"{name} needs at least 2 string endings")
        if not 0 <= doc["gold"] < len(doc["choices"]):
            raise MalformedRowError(f"{name} label {doc['gold']} is not in 0..{len(doc['choices']) - 1}")
    return docs


def contexts(
    docs: Sequence[dict], num_fewshot: int = 0, pool: Sequence[dict] | None = None, seed: int = 1234
) -> list[str]:
    """The scoring context of every doc (zero-shot: the query itself)."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot == 0:
        return [d["query"] for d in docs]
    pool = list(pool if pool is not None else docs)
    if num_fewshot + 1 > len(pool):  # one extra draw replaces the document itself if it is drawn
        raise ValueError(
            f"num_fewshot={num_fewshot} needs at least {num_fewshot + 1} rows to draw from, the pool has {len(pool)}"
        )
    rng = random.Random(seed)
    out = []
    for doc in docs:
        shots = [d for d in rng.sample(pool, num_fewshot + 1) if d is not doc and d != doc][:num_fewshot]
        blocks = [s["query"] + " " + s["choices"][s["gold"]] for s in shots]
        out.append("\n\n".join([*blocks, doc["query"]]))
    return out


def contrastive_contexts(rows_or_docs: Sequence[dict]) -> list[str]:
    """CID's contrastive input for scoring: just the activity label (``"Label:"``), no scene context.

    ``score(ending | full context) - beta * score(ending | label only)`` discounts endings that are
    likely whatever happened in the scene (a domain-conditional PMI in the spirit of Holtzman et al. 2021).
    """
    return [d["query"].split(":", 1)[0] + ":" for d in rows_or_docs]


def continuations(doc: dict) -> list[str]:
    return [" " + choice for choice in doc["choices"]]


class HellaSwagTask(Task):
    """lm-eval's ``hellaswag`` (version 1.0 of its YAML): 4-way multiple choice, acc and acc_norm."""

    name = "hellaswag"
    version = "1.0"
    output_type = LOGLIKELIHOOD
    metrics = ("acc", "acc_norm")
    primary_metric = "acc_norm"
    default_num_fewshot = 0

    def load(self, config) -> TaskData:
        rows, source = load_rows(config.data, "hellaswag/validation")
        docs = process_rows(rows, source)
        # Few-shot exemplars come from the other validation rows (the train split is not shipped).
        return TaskData(take(docs, config.limit), source, docs, {"data": fingerprint_rows(rows)})

    def build_requests(self, data: TaskData, config) -> list[LoglikelihoodRequest]:
        scoring_contexts = contexts(data.docs, self.num_fewshot(config), data.fewshot_pool)
        label_only = contrastive_contexts(data.docs)
        return [
            LoglikelihoodRequest(context, tuple(doc["choices"]), contrastive_context=label)
            for context, doc, label in zip(scoring_contexts, data.docs, label_only)
        ]

    def process_result(self, doc: dict, request: LoglikelihoodRequest, response: LoglikelihoodResponse) -> dict:
        pred, pred_norm = multiple_choice_predictions(response.scores, doc["choices"])
        return {
            "gold": doc["gold"],
            "pred": pred,
            "pred_norm": pred_norm,
            "acc": float(pred == doc["gold"]),
            "acc_norm": float(pred_norm == doc["gold"]),
            "scores": response.scores,
            "expert_loglikelihoods": response.expert_loglikelihoods,
            "contrast_loglikelihoods": response.contrast_loglikelihoods,
            "is_greedy": response.is_greedy,
            "num_tokens": response.num_tokens,
        }
