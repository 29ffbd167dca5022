"""Throughput of greedy vs contrastive decoding (separate / early-exit amateur) vs CID, in one run.

    python benchmarks/bench_decoding.py                       # SmolLM2, 128 new tokens, batch 1 and 8, 5 repeats
    python benchmarks/bench_decoding.py --max-new-tokens 32 --batch-sizes 1 --repeats 3   # quick look

Every method generates exactly ``--max-new-tokens`` tokens per row (EOS is held off with
``min_new_tokens``), so tokens/s compare like with like. Also timed: the amateur alone (the
early-exit shell ``EarlyExitAmateur(model, N).model`` generating greedily), which gives the compute
limit of CD with a separate amateur, ``t_expert / (t_expert + t_amateur)`` of greedy's speed.

Robust to a shared, busy machine: the methods' repeats are interleaved (repeat r runs every method
once, in an order rotated by r), each ratio is computed per repeat from runs seconds apart and
reported as the median with its min-max spread over the repeats, and a goal is only called met
(``min >= goal``) or missed (``max < goal``) when the whole spread is on one side of it; otherwise
the verdict is "inconclusive". A method whose times spread by more than ``--max-spread`` of their
median is flagged as noisy. The load average is recorded at the start and the end. Every ratio is
also computed from process CPU time (all threads), which other jobs competing for the cores inflate
far less than wall time (with ``OMP_NUM_THREADS=1`` there are no spinning worker threads either).

Goals (issue 3): CD separate >= 0.9x that limit; early-exit CD >= 0.85x greedy; CID >= 0.45x greedy.
Peak memory is the process's peak resident set during each method (Linux ``VmHWM``, reset per
run through ``/proc/self/clear_refs``; falls back to the lifetime peak elsewhere).
Results go to ``benchmarks/results/decoding.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine  # noqa: E402

from cdlm.decoding.contrastive_decoding import ContrastiveDecodingLogitsProcessor, EarlyExitContrastiveLogitsProcessor
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.models import EarlyExitAmateur, load_model
from cdlm.models.prompts import render_prompts

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = [
    ("Explain in two sentences why the sky is blue.", "Explain in two sentences."),
    ("Write a short poem about the sea.", "Write a short poem."),
    ("What is 17 + 25? Answer step by step.", "Answer step by step."),
    ("Give three tips for learning to cook.", "Give three tips."),
    ("Describe the water cycle for a ten-year-old.", "Describe it for a ten-year-old."),
    ("Why do cats purr?", "Why?"),
    ("Summarise the plot of Romeo and Juliet.", "Summarise the plot."),
    ("How does a bicycle stay upright?", "How does it stay upright?"),
]


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spread(values: list[float]) -> dict:
    median = statistics.median(values)
    return {
        "median": round(median, 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "relative_spread": round((max(values) - min(values)) / median, 3) if median else None,
    }


def _verdict(spread: dict, goal: float) -> str:
    if spread["min"] >= goal:
        return "met"
    if spread["max"] < goal:
        return "missed"
    return "inconclusive"


GOALS = {"cd_separate_vs_compute_limit": 0.9, "cd_early_exit_vs_greedy": 0.85, "cid_vs_greedy": 0.45}


def _paired_ratios(times: dict[str, list[float]]) -> dict[str, dict]:
    """Speed ratios per repeat (both runs of a pair come from the same repeat, seconds apart), summarised."""
    e, a = times["greedy"], times["amateur alone"]
    per_repeat = {
        "compute_limit_t_e_over_t_e_plus_t_a": [x / (x + y) for x, y in zip(e, a)],
        "cd_separate_vs_greedy": [x / c for x, c in zip(e, times["cd (separate amateur)"])],
        "cd_separate_vs_compute_limit": [(x + y) / c for x, y, c in zip(e, a, times["cd (separate amateur)"])],
        "cd_early_exit_vs_greedy": [x / c for x, c in zip(e, times["cd (early exit)"])],
        "cid_vs_greedy": [x / c for x, c in zip(e, times["cid"])],
    }
    return {key: _spread(values) for key, values in per_repeat.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--exit-layer", type=int, default=8, help="early-exit amateur depth (default 8 of 30)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per method (>= 3 for a spread)")
    parser.add_argument(
        "--max-spread", type=float, default=0.2, help="flag a method whose (max-min)/median time exceeds this"
    )
    parser.add_argument("--output", default=str(RESULTS / "decoding"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    machine_at_start = describe_machine()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    early = EarlyExitAmateur(model, args.exit_layer)
    n = args.max_new_tokens
    common = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def timed(run) -> tuple[float, float, float]:
        """Wall seconds, process CPU seconds (all threads; less sensitive to other jobs taking the cores
        than wall time, though not immune: shared caches and spinning threads still add), peak RSS."""
        resettable = _peak_rss_reset()
        began, began_cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            run()
        seconds, cpu = time.perf_counter() - began, time.process_time() - began_cpu
        return seconds, cpu, _peak_rss_mib() if resettable else float("nan")

    rows: list[dict] = []

    def write_report() -> None:
        """Written after every batch size, so an interrupted run keeps what it measured."""
        load_at_end = os.getloadavg() if hasattr(os, "getloadavg") else None
        report = {
            "command": "python benchmarks/bench_decoding.py "
            + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items()
                if k != "output"
            ),
            "model": args.model,
            "exit_layer": args.exit_layer,
            "max_new_tokens": n,
            "repeats": args.repeats,
            "device": str(model.device),
            "dtype": str(model.dtype),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine_at_start": machine_at_start,
            "load_average_at_start": load_at_start,
            "load_average_at_end": load_at_end,
            "platform": platform.platform(),
            "results": rows,
        }
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

        def fmt(spread: dict) -> str:
            return f"{spread['median']} [{spread['min']}, {spread['max']}]"

        lines = [
            f"# Decoding throughput ({args.model}, {n} new tokens, {model.device}, {torch.get_num_threads()} threads)",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {machine_at_start}; load average (1, 5, 15 min) at start {load_at_start}, "
            f"at end {load_at_end}.",
            "",
            f"{args.repeats} interleaved repeats per method; times and ratios are medians with [min, max] over the "
            "repeats. Ratios are paired per repeat. A goal is met/missed only when the whole spread is on one side.",
            "",
            "| batch | method | tokens/s (median) | seconds median [min, max] | spread "
            "| CPU seconds median [min, max] | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "method" in row:
                flag = " (noisy)" if row["noisy"] else ""
                lines.append(
                    f"| {row['batch']} | {row['method']} | {row['tokens_per_s_median']} | "
                    f"{fmt(row['seconds_spread'])} | {row['seconds_spread']['relative_spread']}{flag} | "
                    f"{fmt(row['cpu_seconds_spread'])} | {row['peak_rss_mib']} |"
                )
        lines += [
            "",
            "| batch | ratio | wall time: median [min, max] | verdict | CPU time: median [min, max] | verdict "
            "| goal |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "ratios" in row:
                for key, value in row["ratios"].items():
                    goal = row["goals"].get(key)
                    lines.append(
                        f"| {row['batch']} | {key} | {fmt(value)} | {row['verdict'].get(key, '')} | "
                        f"{fmt(row['cpu_ratios'][key])} | {row['cpu_verdict'].get(key, '')} | {goal if goal else ''} |"
                    )
        output.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")

    for batch_size in args.batch_sizes:
        chosen = (PAIRS * ((batch_size + len(PAIRS) - 1) // len(PAIRS)))[:batch_size]
        encode = dict(return_tensors="pt", padding=True, add_special_tokens=False)
        batch = tokenizer(render_prompts(tokenizer, [p for p, _ in chosen]), **encode).to(model.device)
        contrastive = tokenizer(render_prompts(tokenizer, [c for _, c in chosen]), **encode).to(model.device)
        mask = batch["attention_mask"]

        def cd_separate():
            cd = ContrastiveDecodingLogitsProcessor(early.model, attention_mask=mask)
            model.generate(**batch, **common, logits_processor=LogitsProcessorList([cd]))

        def cd_early_exit():
            with EarlyExitContrastiveLogitsProcessor(early) as cd:
                model.generate(**batch, **common, logits_processor=LogitsProcessorList([cd]))

        def cid():
            processor = ContrastiveInputLogitsProcessor(model, contrastive["input_ids"], contrastive["attention_mask"])
            model.generate(**batch, **common, logits_processor=LogitsProcessorList([processor]))

        runs = {
            "greedy": lambda: model.generate(**batch, **common),
            "amateur alone": lambda: early.model.generate(**batch, **common),
            "cd (separate amateur)": cd_separate,
            "cd (early exit)": cd_early_exit,
            "cid": cid,
        }
        with torch.inference_mode():  # warm-up: first-call allocations and lazy initialisation
            model.generate(**batch, max_new_tokens=4, do_sample=False)
        names = list(runs)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
        peaks: dict[str, float] = {name: float("nan") for name in names}
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                elapsed, cpu, peak = timed(runs[name])
                seconds[name].append(elapsed)
                cpu_seconds[name].append(cpu)
                peaks[name] = peak if peaks[name] != peaks[name] else max(peaks[name], peak)
                print(
                    f"batch {batch_size} repeat {repeat} {name:22} {batch_size * n / elapsed:8.2f} tokens/s "
                    f"{elapsed:7.2f} s  cpu {cpu:7.2f} s  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        for name in names:
            time_spread = _spread(seconds[name])
            rows.append(
                {
                    "batch": batch_size,
                    "method": name,
                    "seconds": [round(t, 3) for t in seconds[name]],
                    "seconds_spread": time_spread,
                    "cpu_seconds": [round(t, 3) for t in cpu_seconds[name]],
                    "cpu_seconds_spread": _spread(cpu_seconds[name]),
                    "tokens_per_s_median": round(batch_size * n / time_spread["median"], 2),
                    "noisy": bool(time_spread["relative_spread"] and time_spread["relative_spread"] > args.max_spread),
                    "peak_rss_mib": round(peaks[name], 1),
                }
            )
        ratios, cpu_ratios = _paired_ratios(seconds), _paired_ratios(cpu_seconds)
        rows.append(
            {
                "batch": batch_size,
                "ratios": ratios,
                "cpu_ratios": cpu_ratios,
                "goals": GOALS,
                "verdict": {k: _verdict(ratios[k], v) for k, v in GOALS.items()},
                "cpu_verdict": {k: _verdict(cpu_ratios[k], v) for k, v in GOALS.items()},
            }
        )
        print(
            f"batch {batch_size} ratios (median [min, max]): "
            + ", ".join(f"{k} {v['median']} [{v['min']}, {v['max']}]" for k, v in ratios.items()),
            flush=True,
        )
        write_report()


if __name__ == "__main__":
    main()
