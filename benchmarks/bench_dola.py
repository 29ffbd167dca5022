"""DoLa speed: tokens/s of cdlm's DoLa against greedy decoding on the same model, prompts and threads.

DoLa's extra work per token is the LM head on the last position of each candidate layer (7-8 layers
for "low"/"high" on SmolLM2's 30) and the divergences over the vocabulary; the transformer body runs
once, as for greedy. Runs alternate (greedy, dola-high, dola-low, ..., then again) so load from other
processes hits every method alike; the median of each is reported, with the ratio to greedy.
Every run generates exactly ``--max-new-tokens`` tokens (min_new_tokens = max_new_tokens).

    python benchmarks/bench_dola.py                       # batch 1 and 8, 3 repeats
    python benchmarks/bench_dola.py --batch-sizes 1 --repeats 5

Results go to ``benchmarks/results/dola.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "The capital of France is",
    "Q: Who wrote the play Romeo and Juliet?\nA:",
    "The chemical symbol for gold is",
    "The history of the Roman Empire",
    "In 1969, the first humans landed on the Moon. The mission",
    "The theory of evolution by natural selection explains",
    "The tallest mountain in the world is",
    "A recipe for chocolate chip cookies: first,",
]
METHODS = {
    "greedy": {},
    "dola high": {"dola_layers": "high", "repetition_penalty": 1.2},
    "dola low": {"dola_layers": "low", "repetition_penalty": 1.2},
    "dola high, paper form": {"dola_layers": "high", "repetition_penalty": 1.2, "dola_form": "paper"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import cdlm.decoding.dola as dola
    from cdlm.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    machine = describe_machine()
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batch = tokenizer(PROMPTS[:batch_size], return_tensors="pt", padding=True)
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        load = []
        for _ in range(args.repeats):
            for name, extra in METHODS.items():
                kwargs = {"custom_generate": dola, **extra} if extra else {"do_sample": False}
                load.append(os.getloadavg()[0])
                began = time.perf_counter()
                with torch.no_grad():
                    model.generate(
                        **batch,
                        max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                        **kwargs,
                    )
                times[name].append(time.perf_counter() - began)
        greedy = statistics.median(times["greedy"])
        for name, values in times.items():
            seconds = statistics.median(values)
            rows.append(
                {
                    "batch_size": batch_size,
                    "method": name,
                    "median_seconds": round(seconds, 3),
                    "tokens_per_second": round(batch_size * args.max_new_tokens / seconds, 1),
                    "speed_vs_greedy": round(greedy / seconds, 3),
                    "runs": [round(v, 3) for v in values],
                }
            )
        print(
            f"batch {batch_size}: "
            + ", ".join(f"{r['method']} {r['speed_vs_greedy']}x" for r in rows if r["batch_size"] == batch_size)
        )
        rows_load = (min(load), max(load))
        for row in rows:
            row.setdefault("load_average_range", [round(v, 2) for v in rows_load])

    result = {
        "command": "python benchmarks/bench_dola.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "machine": machine,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dola.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"DoLa vs greedy on {args.model}, {args.max_new_tokens} new tokens, "
        f"median of {args.repeats} interleaved runs; {machine}",
        "",
        f"Command: `{result['command']}`",
        "",
        "| batch | method | median s | tokens/s | speed vs greedy | load avg during runs |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        low, high = row["load_average_range"]
        lines.append(
            f"| {row['batch_size']} | {row['method']} | {row['median_seconds']} | {row['tokens_per_second']} | "
            f"{row['speed_vs_greedy']}x | {low}-{high} |"
        )
    (RESULTS / "dola.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'dola.json'} and {RESULTS / 'dola.md'}")


if __name__ == "__main__":
    main()
