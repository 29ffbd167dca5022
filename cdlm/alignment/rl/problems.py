"""Synthetic verifiable prompts for RL demonstrations and tests (no dataset download needed)."""

from __future__ import annotations

import random
from typing import Any


def arithmetic_problems(count: int, seed: int = 0, low: int = 2, high: int = 40) -> list[dict[str, Any]]:
    """Synthetic verifiable prompts (``"What is 17 + 25? Answer with just the number."``) with an ``answer`` column.

    Half additions, half non-negative subtractions; the same ``seed`` always gives the same problems.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if rng.random() < 0.5:
            question, answer = f"What is {a} + {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            question, answer = f"What is {a} - {b}?", a - b
        rows.append({"prompt": f"{question} Answer with just the number.", "answer": answer})
    return rows
