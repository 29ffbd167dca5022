"""Metrics with lm-evaluation-harness 0.4.x semantics: regex answer filters, exact match, acc/acc_norm.

Each function mirrors the lm-eval piece named in its docstring so scores are comparable with
published lm-eval numbers; ``tests/test_eval_metrics.py`` pins them on hand-made cases.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

INVALID = "[invalid]"  # lm-eval RegexFilter's fallback when nothing matches


def regex_extract(text: str, pattern: str | re.Pattern, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval's ``RegexFilter`` + ``take_first`` on one response.

    ``findall`` then pick match ``group_select`` (-1: the last one); with several groups the first
    non-empty group wins; the result is stripped.
    """
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    matches = regex.findall(text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [group for group in match if group]
        if not groups:
            return fallback
        match = groups[0]
    return match.strip()


def normalise_for_exact_match(
    text: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False, ignore_punctuation: bool = False
) -> str:
    """lm-eval's ``exact_match_hf_evaluate`` normalisation: drop each regex in order, then case/punctuation."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        import string

        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, **normalisation) -> float:
    return float(
        normalise_for_exact_match(prediction, **normalisation) == normalise_for_exact_match(reference, **normalisation)
    )


def multiple_choice_predictions(scores: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm) as lm-eval's multiple_choice ``process_results``.

    ``acc`` takes the argmax of the summed continuation log-likelihoods; ``acc_norm`` divides each by
    the length of the choice string (``len(choice)``, i.e. characters, which equals UTF-8 bytes for
    ASCII text: that is what lm-eval 0.4.x computes for ``acc_norm``). Ties go to the first choice,
    as with ``np.argmax``.
    """
    if len(scores) != len(choices) or not scores:
        raise ValueError(f"need one score per choice, got {len(scores)} scores for {len(choices)} choices")
    pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
    normalised = [score / float(len(choice)) if choice else -math.inf for score, choice in zip(scores, choices)]
    pred_norm = max(range(len(scores)), key=lambda i: (normalised[i], -i))
    return pred, pred_norm


def stderr_key(metric: str) -> str:
    """lm-eval's name for a metric's standard error: ``acc`` -> ``acc_stderr``,
    ``exact_match,strict-match`` -> ``exact_match_stderr,strict-match`` (the filter name stays last)."""
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)), lm-eval's ``mean_stderr``."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
