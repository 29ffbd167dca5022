"""Contrastive search speed: cdlm (transformers 5) vs transformers 4.55.4's built-in implementation.

Both run side by side in one benchmark on the same CPU, with the same input ids and thread count:
cdlm in this process, 4.55.4 in a persistent worker subprocess under its own venv (see
``benchmarks/record_contrastive_search_reference.py`` for how to create ``.venv-tf455``). Runs
alternate (old, new, old, new, ...) so load from other processes hits both alike; the median of each
side is reported. Every run also checks that both produced identical tokens.

    python benchmarks/bench_contrastive_search.py                      # k=4 b=1, k=8 b=1, k=4 b=8
    python benchmarks/bench_contrastive_search.py --configs 4x1 --repeats 5

Results go to ``benchmarks/results/contrastive_search.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "The history of the Roman Empire",
    "Once upon a time, there was a little robot who",
    "The best way to learn a new language is",
    "In 1969, the first humans landed on the Moon. The mission",
    "A recipe for chocolate chip cookies: first,",
    "The theory of evolution by natural selection explains",
    "My favourite programming language is Python because",
    "The weather today is sunny and warm, so we decided to",
]


def _worker(gguf: str, threads: int) -> None:
    """Runs under transformers 4.55.4: load the GGUF, then answer one JSON request per stdin line."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    print(json.dumps({"ready": True, "transformers": transformers.__version__, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        input_ids = torch.tensor(request["input_ids"])
        attention_mask = torch.tensor(request["attention_mask"])
        with torch.no_grad():
            began = time.perf_counter()
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                penalty_alpha=request["penalty_alpha"],
                top_k=request["top_k"],
                max_new_tokens=request["max_new_tokens"],
                min_new_tokens=request["max_new_tokens"],
                pad_token_id=request["pad_token_id"],
                trust_remote_code=True,
            )
            seconds = time.perf_counter() - began
        print(json.dumps({"seconds": seconds, "output_ids": out[:, input_ids.shape[1] :].tolist()}), flush=True)


class OldTransformers:
    """The 4.55.4 worker subprocess."""

    def __init__(self, python: str, gguf: Path, threads: int):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen(
            [python, __file__, "--worker", "--gguf", str(gguf), "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the transformers 4.55.4 worker exited; run it by hand with --worker to see why")
        return json.loads(line)

    def run(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="4x1,8x1,4x8", help="comma-separated top_k x batch size")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--penalty-alpha", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and config (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1: stable on a shared CPU)")
    parser.add_argument("--python", default=str(ROOT / ".venv-tf455" / "bin" / "python"), help="interpreter with transformers 4.55.4")
    parser.add_argument("--output", default=str(RESULTS / "contrastive_search"), help="path prefix for .json and .md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        _worker(args.gguf, args.threads)
        return

    import torch
    import transformers

    from cdlm.decoding.contrastive_search import contrastive_search
    from cdlm.models import load_model
    from cdlm.models.registry import get_registered

    torch.set_num_threads(args.threads)
    gguf = get_registered("smollm2-135m-instruct").gguf_path(Path("/nonexistent"))  # a file inside the package
    old = OldTransformers(args.python, gguf, args.threads)
    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    pad = tokenizer.pad_token_id

    def run_new(request: dict) -> dict:
        input_ids = torch.tensor(request["input_ids"])
        attention_mask = torch.tensor(request["attention_mask"])
        with torch.inference_mode():
            began = time.perf_counter()
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                custom_generate=contrastive_search,
                penalty_alpha=request["penalty_alpha"],
                top_k=request["top_k"],
                max_new_tokens=request["max_new_tokens"],
                min_new_tokens=request["max_new_tokens"],
                pad_token_id=request["pad_token_id"],
            )
            seconds = time.perf_counter() - began
        return {"seconds": seconds, "output_ids": out[:, input_ids.shape[1] :].tolist()}

    def run_greedy(request: dict) -> float:
        """Plain greedy on the same rows: the ceiling for any method that needs >= 1 forward per token."""
        with torch.inference_mode():
            began = time.perf_counter()
            model.generate(
                input_ids=torch.tensor(request["input_ids"]),
                attention_mask=torch.tensor(request["attention_mask"]),
                do_sample=False,
                max_new_tokens=request["max_new_tokens"],
                min_new_tokens=request["max_new_tokens"],
                pad_token_id=request["pad_token_id"],
            )
            return time.perf_counter() - began

    results = []
    for config in args.configs.split(","):
        top_k, batch_size = (int(x) for x in config.lower().split("x"))
        batch = tokenizer(PROMPTS[:batch_size], return_tensors="pt", padding=True)
        request = {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "penalty_alpha": args.penalty_alpha,
            "top_k": top_k,
            "max_new_tokens": args.max_new_tokens,
            "pad_token_id": pad,
        }
        warm = {**request, "max_new_tokens": 4}
        old.run(warm)
        run_new(warm)
        old_seconds, new_seconds, greedy_seconds, identical = [], [], [], True
        for _ in range(args.repeats):
            o = old.run(request)
            n = run_new(request)
            old_seconds.append(o["seconds"])
            new_seconds.append(n["seconds"])
            greedy_seconds.append(run_greedy(request))
            identical &= o["output_ids"] == n["output_ids"]
        tokens = batch_size * args.max_new_tokens
        old_tps = tokens / statistics.median(old_seconds)
        new_tps = tokens / statistics.median(new_seconds)
        greedy_tps = tokens / statistics.median(greedy_seconds)
        row = {
            "top_k": top_k,
            "batch_size": batch_size,
            "new_tokens_per_row": args.max_new_tokens,
            "transformers_4_55_tokens_per_s": round(old_tps, 2),
            "cdlm_tokens_per_s": round(new_tps, 2),
            "speedup": round(new_tps / old_tps, 3),
            "cdlm_greedy_tokens_per_s": round(greedy_tps, 2),
            "cdlm_over_greedy": round(new_tps / greedy_tps, 3),
            "identical_tokens": identical,
            "old_seconds": [round(s, 3) for s in old_seconds],
            "cdlm_seconds": [round(s, 3) for s in new_seconds],
        }
        results.append(row)
        print(
            f"k={top_k} batch={batch_size}: 4.55.4 {old_tps:.2f} tok/s, cdlm {new_tps:.2f} tok/s, "
            f"speedup {new_tps / old_tps:.2f}x, identical tokens: {identical}; greedy {greedy_tps:.2f} tok/s",
            flush=True,
        )
    old.close()

    record = {
        "benchmark": "contrastive search, SmolLM2-135M-Instruct float32 CPU, min_new_tokens = max_new_tokens",
        "command": "python benchmarks/bench_contrastive_search.py " + " ".join(sys.argv[1:]),
        "penalty_alpha": args.penalty_alpha,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": describe_machine(),
        "old": {"transformers": old.info.get("transformers"), "torch": old.info.get("torch")},
        "new": {"transformers": transformers.__version__, "torch": torch.__version__},
        "results": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# Contrastive search: cdlm vs transformers 4.55.4",
        "",
        f"`{record['command']}` — SmolLM2-135M-Instruct, float32, CPU ({record['machine']}), "
        f"{args.threads} torch thread(s), penalty_alpha={args.penalty_alpha}, {args.max_new_tokens} new tokens per row, "
        f"median of {args.repeats} alternating runs per side.",
        "",
        "| top_k | batch | 4.55.4 tok/s | cdlm tok/s | speedup | identical tokens | cdlm greedy tok/s | cdlm CS / greedy |",
        "|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['top_k']} | {r['batch_size']} | {r['transformers_4_55_tokens_per_s']} | {r['cdlm_tokens_per_s']} | "
            f"{r['speedup']}x | {'yes' if r['identical_tokens'] else 'NO'} | {r['cdlm_greedy_tokens_per_s']} | {r['cdlm_over_greedy']} |"
        )
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
