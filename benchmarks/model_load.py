"""First/second load time and greedy tokens/s for the registered real models.

Each model is loaded in a fresh subprocess twice against an empty temporary cache: the first load
dequantises the GGUF and writes the cache, the second reads it. Run:

    .venv/bin/python benchmarks/model_load.py [--models smollm2-135m-instruct gemma3-270m]

Writes benchmarks/results/model_load.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import describe_machine

CHILD = r"""
import json, sys, time, torch
from cdlm.models import load_model
lm = load_model(sys.argv[1], device="cpu")
ids = lm.tokenizer(["The history of the Roman Empire"], return_tensors="pt")
with torch.inference_mode():
    lm.model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = lm.model.generate(**ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    seconds = time.perf_counter() - start
print(json.dumps({"load_seconds": lm.load_seconds, "cache_hit": lm.cache_hit,
                  "greedy_tokens_per_s": (out.shape[1] - ids["input_ids"].shape[1]) / seconds}))
"""


def measure(model: str, cache: str) -> dict:
    env = {**os.environ, "CDLM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {
        "model": model,
        "first_load_s": round(runs[0]["load_seconds"], 2),
        "second_load_s": round(runs[1]["load_seconds"], 2),
        "second_was_cache_hit": runs[1]["cache_hit"],
        "greedy_tokens_per_s_batch1": round(runs[1]["greedy_tokens_per_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    args = parser.parse_args()
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as cache:
        rows = [measure(model, cache) for model in args.models]
    out = Path(__file__).parent / "results" / "model_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print("| model | first load (s) | second load (s) | greedy tokens/s (batch 1, 64 tokens) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['model']} | {row['first_load_s']} | {row['second_load_s']} | {row['greedy_tokens_per_s_batch1']} |"
        )


if __name__ == "__main__":
    main()
