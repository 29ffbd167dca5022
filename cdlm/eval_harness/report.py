"""Summary tables (plain text / markdown), an optional comparison plot, and lm-eval's results layout."""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Sequence

from cdlm.eval_harness.metrics import stderr_key


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def rows(results: Sequence[dict]) -> list[dict]:
    """One flat row per (run, metric) with value and stderr."""
    out = []
    for result in results:
        method = result["method"]
        label = method["method"]
        for name, value in result["results"].items():
            if "_stderr" in name or not _is_number(value):
                continue  # stderrs sit beside their metric; text (e.g. openended's judge) is a setting, not a score
            timing = result.get("timing", {})
            out.append(
                {
                    "task": result["task"],
                    "method": label,
                    "metric": name,
                    "value": value,
                    "stderr": result["results"].get(stderr_key(name)),
                    "n": result["n_samples"],
                    "examples/s": timing.get("examples_per_second"),
                    "tokens/s": timing.get("tokens_per_second"),
                }
            )
    return out


def lm_eval_key(metric: str) -> str:
    """cdlm's metric name in lm-eval's ``metric,filter`` form: ``acc`` -> ``acc,none``; filtered names stay."""
    return metric if "," in metric else metric + ",none"


def lm_eval_layout(result: dict) -> dict:
    """One cdlm results dict in the layout of lm-eval 0.4.x's ``results_<date>.json``.

    Metrics sit under ``results[<task>]`` keyed ``acc,none`` / ``acc_stderr,none`` (``make_table`` and
    other lm-eval tooling read them there), with ``versions``, ``n-shot``, ``higher_is_better`` and
    ``n-samples`` beside them; cdlm's own record (method, scoring, timing) is kept under ``cdlm``.
    """
    task = result["task"]
    metrics = {"alias": task}
    for name, value in result["results"].items():
        metrics[lm_eval_key(name)] = value if value == value else "N/A"  # lm-eval writes NaN stderrs as "N/A"
    higher = result.get("higher_is_better") or {}
    method = result["method"]
    model_args = ",".join(f"{k}={v}" for k, v in {"pretrained": result["model"]["reference"], **method}.items())
    return {
        "results": {task: metrics},
        "versions": {task: result.get("task_version")},
        "n-shot": {task: result.get("num_fewshot")},
        "higher_is_better": {task: {name: value for name, value in higher.items()}},
        "n-samples": {task: {"original": result["n_samples"], "effective": result["n_samples"]}},
        "config": {
            "model": "cdlm",
            "model_args": model_args,
            "batch_size": result["config"].get("batch_size"),
            "limit": result["config"].get("limit"),
        },
        "cdlm": {k: result[k] for k in ("method", "scoring", "backend", "model", "timing", "versions") if k in result},
    }


COLUMNS = ("task", "method", "metric", "value", "stderr", "n", "examples/s", "tokens/s")


def markdown_table(results: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(results):
        lines.append("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def text_table(results: Sequence[dict]) -> str:
    table = [list(COLUMNS)] + [[_fmt(row[c]) for c in COLUMNS] for row in rows(results)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in table) + "\n"


def y_limits(values: Sequence[float], errors: Sequence[float]) -> tuple[float, float]:
    """Axis range holding every bar and error bar, from 0 (or below, for negative values), with 20% headroom.

    Degenerate data (all zero, all NaN) gets the unit range instead of a tiny or empty one.
    """
    low = min([0.0, *(v for v in values if math.isfinite(v))])
    high = max([0.0, *(v + e for v, e in zip(values, errors) if math.isfinite(v + e))])
    if high - low <= 0:
        return 0.0, 1.0
    return (low * 1.2 if low < 0 else 0.0), (high * 1.2 if high > 0 else 0.0)


def plot(results: Sequence[dict], path: str | Path, title: str | None = None) -> Path | None:
    """Bar chart of each metric per method with stderr bars; None (no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = rows(results)
    metrics = list(dict.fromkeys(r["metric"] for r in table))
    methods = list(dict.fromkeys(r["method"] for r in table))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values = [
            next((r["value"] for r in table if r["metric"] == metric and r["method"] == m), 0.0) for m in methods
        ]
        errors = [
            next((r["stderr"] or 0.0 for r in table if r["metric"] == metric and r["method"] == m), 0.0)
            for m in methods
        ]
        errors = [e if math.isfinite(e) else 0.0 for e in errors]
        axis.bar(methods, values, yerr=errors, capsize=4, color="tab:blue")
        axis.set_title(metric)
        axis.set_ylim(*y_limits(values, errors))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
