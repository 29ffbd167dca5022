"""GSM8K as lm-eval 0.4.x's ``gsm8k`` task (5-shot Question/Answer), and the pieces ``gsm8k_cot`` reuses.

Each test question gets 5 exemplars drawn from the train split by one ``random.Random(1234)`` that
advances across documents in order (``rnd.sample(train, 5)`` per doc), exactly as lm-eval's default
``ContextSampler`` with ``fewshot_random_seed=1234`` does, so document i sees the same exemplars as in an
lm-eval run over the same documents (this is why prompts are built for the whole document list at once).

Contrastive input (``cid``): the contrastive prompt is the same prompt with the few-shot exemplars
removed (just "Question: <q>\\nAnswer:"), so the contrast rewards what the worked examples add.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from cdlm.eval_harness.data import load_rows, take, validate_rows
from cdlm.eval_harness.metrics import exact_match, regex_extract
from cdlm.eval_harness.task import (
    GENERATE_UNTIL,
    GenerationRequest,
    GenerationResponse,
    Task,
    TaskData,
    fingerprint_rows,
)

FIELDS = {"question": str, "answer": str}
REGEXES_TO_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class GSM8KFormat:
    """One lm-eval GSM8K task variant: prompt template, exemplars, stop strings and answer filters.

    ``fixed_exemplars`` None: exemplars are drawn from the train split (``gsm8k``); otherwise the first
    ``num_fewshot`` of these (question, answer) pairs are used for every question (``gsm8k_cot``).
    ``final_answer_only``: the reference is the text after ``####`` (``gsm8k_cot``) instead of the
    whole answer (``gsm8k``, whose ignore-regexes drop everything up to ``#### ``).
    """

    name: str
    question_prefix: str
    answer_prefix: str
    num_fewshot: int
    until: tuple[str, ...]
    strict_pattern: str
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    fixed_exemplars: tuple[tuple[str, str], ...] | None = None
    final_answer_only: bool = False

    def render_question(self, question: str) -> str:
        return f"{self.question_prefix}{question}\n{self.answer_prefix}"

    def reference(self, row: dict) -> str:
        """The gold string as lm-eval compares it (before the ignore-regexes)."""
        if self.final_answer_only:
            return row["answer"].split("####")[-1].strip()
        return row["answer"]


GSM8K = GSM8KFormat("gsm8k", "Question: ", "Answer:", 5, ("Question:", "</s>", "<|im_end|>"), r"#### (\-?[0-9\.\,]+)")


def build_prompts(
    fmt: GSM8KFormat,
    rows: Sequence[dict],
    train_rows: Sequence[dict] | None = None,
    num_fewshot: int | None = None,
    seed: int = FEWSHOT_SEED,
) -> list[str]:
    """Few-shot prompts for ``rows`` in order (the exemplar draw depends on the position, see module doc)."""
    shots = fmt.num_fewshot if num_fewshot is None else num_fewshot
    if shots < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {shots}")
    if fmt.fixed_exemplars is not None and shots > len(fmt.fixed_exemplars):
        raise ValueError(f"{fmt.name} has {len(fmt.fixed_exemplars)} exemplars, asked for num_fewshot={shots}")
    if fmt.fixed_exemplars is None and shots:
        if not train_rows:
            raise ValueError(f"{fmt.name} few-shot prompts need the train split")
        if shots > len(train_rows):
            raise ValueError(f"num_fewshot={shots} is larger than the {len(train_rows)} few-shot rows available")
    prompts = []
    rng = random.Random(seed)
    for row in rows:
        if fmt.fixed_exemplars is not None:
            examples = list(fmt.fixed_exemplars[:shots])  # lm-eval's first_n sampler
        elif shots:
            examples = [(d["question"], d["answer"]) for d in rng.sample(list(train_rows or ()), shots)]
        else:
            examples = []
        turns = [fmt.render_question(q) + fmt.target_delimiter + a for q, a in examples]
        prompts.append(fmt.fewshot_delimiter.join([*turns, fmt.render_question(row["question"])]))
    return prompts


def contrastive_prompts(fmt: GSM8KFormat, rows: Sequence[dict]) -> list[str]:
    """CID's contrastive input: the question without the few-shot exemplars (zero-shot prompt)."""
    return [fmt.render_question(row["question"]) for row in rows]


def score(fmt: GSM8KFormat, response: str, row: dict) -> dict:
    """strict-match and flexible-extract exact match of one response, as lm-eval computes them."""
    reference = fmt.reference(row)
    norm = {"regexes_to_ignore": REGEXES_TO_IGNORE, "ignore_case": True, "ignore_punctuation": False}
    strict = regex_extract(response, fmt.strict_pattern)
    flexible = regex_extract(response, FLEXIBLE, group_select=-1)
    return {
        "strict_answer": strict,
        "flexible_answer": flexible,
        "exact_match,strict-match": exact_match(strict, reference, **norm),
        "exact_match,flexible-extract": exact_match(flexible, reference, **norm),
    }


class GSM8KTask(Task):
    """lm-eval's ``gsm8k`` (version 3.0 of its YAML): strict-match and flexible-extract exact match."""

    name = "gsm8k"
    version = "3.0"
    output_type = GENERATE_UNTIL
    metrics = ("exact_match,strict-match", "exact_match,flexible-extract")
    primary_metric = "exact_match,strict-match"
    default_num_fewshot = GSM8K.num_fewshot
    format: GSM8KFormat = GSM8K

    def load(self, config) -> TaskData:
        rows, source = load_rows(config.data, "gsm8k/test")
        validate_rows(rows, FIELDS, source)
        fingerprints = {"data": fingerprint_rows(rows)}
        pool = None
        if self.format.fixed_exemplars is None and self.num_fewshot(config) > 0:
            pool, pool_source = load_rows(config.fewshot_data, "gsm8k/train")
            validate_rows(pool, FIELDS, pool_source)
            fingerprints["fewshot_data"] = fingerprint_rows(pool)
        return TaskData(take(rows, config.limit), source, pool, fingerprints)

    def build_requests(self, data: TaskData, config) -> list[GenerationRequest]:
        prompts = build_prompts(self.format, data.docs, data.fewshot_pool, self.num_fewshot(config))
        zero_shot = contrastive_prompts(self.format, data.docs)
        return [GenerationRequest(p, self.format.until, contrastive_prompt=c) for p, c in zip(prompts, zero_shot)]

    def process_result(self, doc: dict, request: GenerationRequest, response: GenerationResponse) -> dict:
        return {
            "question": doc["question"],
            "target": self.format.reference(doc),
            "prompt": request.prompt,
            "contrastive_prompt": request.contrastive_prompt,
            "response": response.text,
            **score(self.format, response.text, doc),
        }
