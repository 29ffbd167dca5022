"""GSM8K in lm-eval 0.4.x's two formats: ``gsm8k`` (5-shot Question/Answer) and ``gsm8k_cot`` (8-shot CoT).

``gsm8k``: each test question gets 5 exemplars drawn from the train split by one ``random.Random(1234)``
that advances across documents in order (``rnd.sample(train, 5)`` per doc), exactly as lm-eval's default
``ContextSampler`` with ``fewshot_random_seed=1234`` does, so document i sees the same exemplars as in an
lm-eval run over the same documents (this is why prompts are built for the whole document list at once).

``gsm8k_cot``: the 8 fixed chain-of-thought exemplars of Wei et al. (2022), in lm-eval's ``gsm8k-cot``
rendering ("Q: ...\\nA: ... The answer is N."), the format O'Brien & Lewis (2023) evaluate contrastive
decoding on.

Contrastive input (``cid``): the contrastive prompt is the same prompt with the few-shot exemplars
removed (just "Question: <q>\\nAnswer:"), so the contrast rewards what the worked examples add.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from cdlm.eval_harness.metrics import exact_match, regex_extract

FIELDS = {"question": str, "answer": str}
REGEXES_TO_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FEWSHOT_SEED = 1234

# Wei et al. (2022) chain-of-thought exemplars, as rendered by lm-eval's gsm8k-cot task.
COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)


@dataclass(frozen=True)
class GSM8KFormat:
    """One lm-eval GSM8K task variant: prompt template, stop strings and answer filters."""

    name: str
    question_prefix: str
    answer_prefix: str
    num_fewshot: int
    until: tuple[str, ...]
    strict_pattern: str
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    notes: dict = field(default_factory=dict)

    def render_question(self, question: str) -> str:
        return f"{self.question_prefix}{question}\n{self.answer_prefix}"

    def reference(self, row: dict) -> str:
        """The gold string as lm-eval compares it (before the ignore-regexes)."""
        if self.name == "gsm8k_cot":
            return row["answer"].split("####")[-1].strip()
        return row["answer"]


GSM8K = GSM8KFormat("gsm8k", "Question: ", "Answer:", 5, ("Question:", "</s>", "<|im_end|>"), r"#### (\-?[0-9\.\,]+)")
GSM8K_COT = GSM8KFormat("gsm8k_cot", "Q: ", "A:", 8, ("Q:", "</s>", "<|im_end|>"), r"The answer is (\-?[0-9\.\,]+).")
FORMATS = {f.name: f for f in (GSM8K, GSM8K_COT)}


def build_prompts(
    fmt: GSM8KFormat, rows: Sequence[dict], train_rows: Sequence[dict] | None = None, num_fewshot: int | None = None,
    seed: int = FEWSHOT_SEED,
) -> list[str]:
    """Few-shot prompts for ``rows`` in order (the exemplar draw depends on the position, see module doc)."""
    shots = fmt.num_fewshot if num_fewshot is None else num_fewshot
    if shots < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {shots}")
    prompts = []
    rng = random.Random(seed)
    for row in rows:
        if fmt.name == "gsm8k_cot":
            if shots > len(COT_EXEMPLARS):
                raise ValueError(f"gsm8k_cot has {len(COT_EXEMPLARS)} exemplars, asked for {shots}")
            examples = list(COT_EXEMPLARS[:shots])  # lm-eval's first_n sampler
        elif shots:
            if not train_rows:
                raise ValueError("gsm8k few-shot prompts need the train split")
            examples = [(d["question"], d["answer"]) for d in rng.sample(list(train_rows), shots)]
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
