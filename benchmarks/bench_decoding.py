"""Throughput of greedy vs contrastive decoding (separate / early-exit amateur) vs CID, in one run.

    python benchmarks/bench_decoding.py                       # SmolLM2, 128 new tokens, batch 1 and 8
    python benchmarks/bench_decoding.py --max-new-tokens 32 --batch-sizes 1   # quick look

Every method generates exactly ``--max-new-tokens`` tokens per row (EOS is held off with
``min_new_tokens``), so tokens/s compare like with like. Also timed: the amateur alone (the
early-exit shell ``EarlyExitAmateur(model, N).model`` generating greedily), which gives the compute
limit of CD with a separate amateur, ``t_expert / (t_expert + t_amateur)`` of greedy's speed.

Goals (issue 3): CD separate >= 0.9x that limit; early-exit CD >= 0.85x greedy; CID >= 0.45x greedy.
Peak memory is the process's peak resident set during each method (Linux ``VmHWM``, reset per
method through ``/proc/self/clear_refs``; falls back to the lifetime peak elsewhere).
Results go to ``benchmarks/results/decoding.json`` and ``.md``; ratios are from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LogitsProcessorList

from cdlm.decoding.contrastive_decoding import ContrastiveDecodingLogitsProcessor, EarlyExitContrastiveLogitsProcessor
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.models import EarlyExitAmateur, load_model

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


def _render(tokenizer, texts):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--exit-layer", type=int, default=8, help="early-exit amateur depth (default 8 of 30)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method; the fastest counts")
    parser.add_argument("--output", default=str(RESULTS / "decoding"))
    args = parser.parse_args()

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    early = EarlyExitAmateur(model, args.exit_layer)
    n = args.max_new_tokens
    common = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def timed(run) -> tuple[float, float]:
        best = float("inf")
        resettable = _peak_rss_reset()
        for _ in range(args.repeats):
            began = time.perf_counter()
            with torch.inference_mode():
                run()
            best = min(best, time.perf_counter() - began)
        return best, _peak_rss_mib() if resettable else float("nan")

    rows = []
    for batch_size in args.batch_sizes:
        chosen = (PAIRS * ((batch_size + len(PAIRS) - 1) // len(PAIRS)))[:batch_size]
        batch = tokenizer(_render(tokenizer, [p for p, _ in chosen]), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        contrastive = tokenizer(_render(tokenizer, [c for _, c in chosen]), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
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
        measured = {}
        for name, run in runs.items():
            seconds, peak = timed(run)
            measured[name] = seconds
            rows.append({"batch": batch_size, "method": name, "seconds": round(seconds, 3),
                         "tokens_per_s": round(batch_size * n / seconds, 2), "peak_rss_mib": round(peak, 1)})
            print(f"batch {batch_size} {name:22} {batch_size * n / seconds:8.2f} tokens/s  {seconds:7.2f} s  peak RSS {peak:7.1f} MiB", flush=True)
        t_e, t_a = measured["greedy"], measured["amateur alone"]
        limit = t_e / (t_e + t_a)
        ratios = {
            "compute_limit_t_e_over_t_e_plus_t_a": round(limit, 3),
            "cd_separate_vs_greedy": round(t_e / measured["cd (separate amateur)"], 3),
            "cd_separate_vs_compute_limit": round((t_e / measured["cd (separate amateur)"]) / limit, 3),
            "cd_early_exit_vs_greedy": round(t_e / measured["cd (early exit)"], 3),
            "cid_vs_greedy": round(t_e / measured["cid"], 3),
        }
        goals = {"cd_separate_vs_compute_limit": 0.9, "cd_early_exit_vs_greedy": 0.85, "cid_vs_greedy": 0.45}
        rows.append({"batch": batch_size, "ratios": ratios, "goals": goals,
                     "met": {k: ratios[k] >= v for k, v in goals.items()}})
        print(f"batch {batch_size} ratios: {json.dumps(ratios)}", flush=True)

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {
        "command": "python benchmarks/bench_decoding.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "output"),
        "model": args.model, "exit_layer": args.exit_layer, "max_new_tokens": n,
        "device": str(model.device), "dtype": str(model.dtype), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_at_end": load, "platform": platform.platform(),
        "results": rows,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Decoding throughput ({args.model}, {n} new tokens, {model.device}, {torch.get_num_threads()} threads)", "",
             f"Command: `{report['command']}`; load average at the end: {load}", "",
             "| batch | method | tokens/s | seconds | peak RSS MiB |", "|---|---|---|---|---|"]
    for row in rows:
        if "method" in row:
            lines.append(f"| {row['batch']} | {row['method']} | {row['tokens_per_s']} | {row['seconds']} | {row['peak_rss_mib']} |")
    lines += ["", "| batch | ratio | value | goal | met |", "|---|---|---|---|---|"]
    for row in rows:
        if "ratios" in row:
            for key, value in row["ratios"].items():
                goal = row["goals"].get(key)
                lines.append(f"| {row['batch']} | {key} | {value} | {goal if goal else ''} | {row['met'].get(key, '')} |")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
