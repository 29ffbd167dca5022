"""Contrastive search speed against plain greedy and transformers 4.55.4, short and long (GSM8K 5-shot) prompts.

Methods, all on the same input ids, thread count and CPU:

* ``greedy``: transformers 5 ``generate(do_sample=False)``, the ceiling for any method needing one forward per token;
* ``cs``: cdlm's contrastive search as users get it (``candidate_layout="auto"``: the k candidates of a row as k
  query positions over one copy of the row's cache, after a one-row check on the first step);
* ``cs_per_row``: cdlm with ``candidate_layout="row_per_candidate"`` (4.55.4's layout, B*k cache rows);
* ``tf455``: transformers 4.55.4's built-in contrastive search, in a persistent worker under ``.venv-tf455``
  (see ``benchmarks/record_contrastive_search_reference.py``);
* ``prefill``: greedy with one new token, so decode-only times can be told apart from the shared prompt cost.

The machine is a shared, noisy 2-core box, so within each repeat the methods run back to back in an order that
rotates between repeats, every run records the load average, and the report gives the median and the spread
(min..max) of each method and of the per-repeat ratios. A ratio whose min..max range straddles the goal, or
whose spread exceeds ``--max-spread``, is marked inconclusive. Every repeat also checks that all contrastive
search runs produced the same tokens.

    python benchmarks/bench_contrastive_search.py                       # 4x1 and 4x8, short and long prompts
    python benchmarks/bench_contrastive_search.py --configs 4x8:long --methods greedy,cs,prefill --repeats 5

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
SHORT_PROMPTS = [
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
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    print(
        json.dumps({"ready": True, "transformers": transformers.__version__, "torch": torch.__version__}), flush=True
    )
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


GOAL = 0.85  # issue 14: contrastive search >= 0.85x greedy tokens/s at batch 8 with ~900-token prompts
METHODS = ("prefill", "greedy", "cs", "cs_per_row", "tf455")


def _long_prompts(batch_size: int) -> list[str]:
    """GSM8K 5-shot prompts (lm-eval's format, cdlm's packaged data): about 800-1100 SmolLM2 tokens each."""
    from cdlm.eval_harness.data import packaged_path, read_jsonl
    from cdlm.eval_harness.tasks.gsm8k import GSM8K, build_prompts

    test, train = read_jsonl(packaged_path("gsm8k/test")), read_jsonl(packaged_path("gsm8k/train"))
    return build_prompts(GSM8K, test[:batch_size], train)


def _spread(values: list[float]) -> dict:
    median = statistics.median(values)
    return {
        "median": round(median, 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "spread": round((max(values) - min(values)) / median, 3) if median else None,
        "rounds": len(values),
    }


def _verdict(ratio: dict, max_spread: float, goal: float | None) -> str:
    if ratio["rounds"] < 2:
        return "inconclusive (one round)"
    if ratio["spread"] is None or ratio["spread"] > max_spread:
        return "inconclusive (spread)"
    if goal is None:
        return "ok"
    if ratio["min"] >= goal:
        return "goal met"
    if ratio["max"] < goal:
        return "goal missed"
    return "inconclusive (straddles goal)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", default="4x1:short,4x8:short,4x1:long,4x8:long", help="top_k x batch : short|long"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--penalty-alpha", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per config (after one short warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads everywhere (default 1: steadier on a shared CPU)"
    )
    parser.add_argument(
        "--max-spread", type=float, default=0.25, help="(max-min)/median above which a ratio is inconclusive"
    )
    parser.add_argument(
        "--python", default=str(ROOT / ".venv-tf455" / "bin" / "python"), help="interpreter with transformers 4.55.4"
    )
    parser.add_argument("--output", default=str(RESULTS / "contrastive_search"), help="path prefix for .json and .md")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the results already in --output (e.g. another method set) instead of replacing them",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        _worker(args.gguf, args.threads)
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    configs = []
    for config in args.configs.split(","):
        sizes, _, kind = config.partition(":")
        if kind not in ("short", "long"):
            raise SystemExit(f"config {config!r}: expected TOPKxBATCH:short or TOPKxBATCH:long")
        top_k, batch_size = (int(x) for x in sizes.lower().split("x"))
        configs.append((top_k, batch_size, kind))

    import torch
    import transformers

    from cdlm.decoding.contrastive_search import contrastive_search
    from cdlm.models import load_model
    from cdlm.models.registry import get_registered

    torch.set_num_threads(args.threads)
    old = None
    if "tf455" in methods:
        gguf = get_registered("smollm2-135m-instruct").gguf_path(Path("/nonexistent"))  # a file inside the package
        old = OldTransformers(args.python, gguf, args.threads)
    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"

    def run_cdlm(method: str, request: dict) -> dict:
        new_tokens = 1 if method == "prefill" else request["max_new_tokens"]
        kwargs = {}
        if method in ("cs", "cs_per_row"):
            kwargs = dict(
                custom_generate=contrastive_search,
                penalty_alpha=request["penalty_alpha"],
                top_k=request["top_k"],
                candidate_layout="auto" if method == "cs" else "row_per_candidate",
            )
        with torch.inference_mode():
            began = time.perf_counter()
            out = model.generate(
                input_ids=torch.tensor(request["input_ids"]),
                attention_mask=torch.tensor(request["attention_mask"]),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=request["pad_token_id"],
                **kwargs,
            )
            seconds = time.perf_counter() - began
        return {"seconds": seconds, "output_ids": out[:, len(request["input_ids"][0]) :].tolist()}

    def run(method: str, request: dict) -> dict:
        result = old.run(request) if method == "tf455" else run_cdlm(method, request)
        return {**result, "load": round(os.getloadavg()[0], 2)}

    results = []
    for top_k, batch_size, kind in configs:
        prompts = SHORT_PROMPTS[:batch_size] if kind == "short" else _long_prompts(batch_size)
        if len(prompts) < batch_size:
            raise SystemExit(f"only {len(prompts)} {kind} prompts for batch {batch_size}")
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        request = {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "penalty_alpha": args.penalty_alpha,
            "top_k": top_k,
            "max_new_tokens": args.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }
        prompt_tokens = batch["attention_mask"].sum(-1).tolist()
        warm = {
            **request,
            "input_ids": request["input_ids"][:1],
            "attention_mask": request["attention_mask"][:1],
            "max_new_tokens": 2,
        }  # one short row: warms allocators and code paths without a second long prefill
        for method in methods:
            run(method, warm)
        seconds = {m: [] for m in methods}
        loads, identical = [], True
        for repeat in range(args.repeats):
            order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
            outputs = {}
            for method in order:
                result = run(method, request)
                seconds[method].append(result["seconds"])
                outputs[method] = result["output_ids"]
                loads.append(result["load"])
            searched = [outputs[m] for m in ("cs", "cs_per_row", "tf455") if m in outputs]
            identical &= all(o == searched[0] for o in searched)
            print(
                f"  {top_k}x{batch_size}:{kind} repeat {repeat}: "
                + ", ".join(f"{m} {seconds[m][-1]:.2f}s" for m in methods)
                + f", load {loads[-1]}",
                flush=True,
            )
        tokens = batch_size * args.max_new_tokens
        row = {
            "top_k": top_k,
            "batch_size": batch_size,
            "prompts": kind,
            "prompt_tokens": {
                "min": min(prompt_tokens),
                "max": max(prompt_tokens),
                "padded": batch["input_ids"].shape[1],
            },
            "new_tokens_per_row": args.max_new_tokens,
            "identical_tokens": identical if sum(m in methods for m in ("cs", "cs_per_row", "tf455")) > 1 else None,
            "load_average": _spread(loads),
            "seconds": {m: [round(s, 3) for s in seconds[m]] for m in methods},
            "tokens_per_s": {m: _spread([tokens / s for s in seconds[m]]) for m in methods if m != "prefill"},
            "ratios": {},
        }
        # Per-repeat ratios (methods of one repeat ran back to back, so they saw similar load).
        pairs = [
            ("cs", "greedy"),
            ("cs_per_row", "greedy"),
            ("tf455", "greedy"),
            ("cs", "tf455"),
            ("cs", "cs_per_row"),
        ]
        for a, b in pairs:
            if a in methods and b in methods:
                ratio = _spread([sb / sa for sa, sb in zip(seconds[a], seconds[b])])
                goal = GOAL if (a, b) == ("cs", "greedy") and batch_size == 8 and kind == "long" else None
                ratio["verdict"] = _verdict(ratio, args.max_spread, goal)
                row["ratios"][f"{a}/{b}"] = ratio
                if "prefill" in methods and b == "greedy":
                    decode = _spread(
                        [(sb - sp) / (sa - sp) for sa, sb, sp in zip(seconds[a], seconds[b], seconds["prefill"])]
                    )
                    decode["verdict"] = _verdict(decode, args.max_spread, None)
                    row["ratios"][f"{a}/{b} decode only"] = decode
        results.append(row)
        print(
            f"{top_k}x{batch_size}:{kind}: "
            + "; ".join(
                f"{name} {r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}] {r['verdict']}"
                for name, r in row["ratios"].items()
            )
            + f"; identical tokens: {identical}",
            flush=True,
        )
    if old is not None:
        old.close()

    record = {
        "benchmark": "contrastive search vs greedy (and transformers 4.55.4), SmolLM2-135M-Instruct float32 CPU, "
        "min_new_tokens = max_new_tokens; ratios are tokens/s of the first over the second, per repeat",
        "command": "python benchmarks/bench_contrastive_search.py " + " ".join(sys.argv[1:]),
        "penalty_alpha": args.penalty_alpha,
        "threads": args.threads,
        "repeats": args.repeats,
        "max_spread": args.max_spread,
        "goal": f"cs/greedy >= {GOAL} at batch 8 with long prompts",
        "machine": describe_machine(),
        "old": {"transformers": old.info.get("transformers"), "torch": old.info.get("torch")} if old else None,
        "new": {"transformers": transformers.__version__, "torch": torch.__version__},
        "results": results,
    }
    output = Path(args.output)
    if args.append and output.with_suffix(".json").exists():
        record = _merge(json.loads(output.with_suffix(".json").read_text()), record)
    write_report(record, output)
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")


def _merge(earlier: dict, record: dict) -> dict:
    """One record holding the results of two runs (e.g. different method sets), each run's settings kept."""
    runs = earlier.get("runs") or [{k: v for k, v in earlier.items() if k not in ("results", "runs")}]
    merged = {**record, "runs": runs + [{k: v for k, v in record.items() if k not in ("results", "runs")}]}
    merged["results"] = earlier["results"] + record["results"]
    return merged


def write_report(record: dict, output: Path) -> None:
    """``output``.json (everything) and ``output``.md (the table)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    results = record["results"]
    output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    commands = " and ".join(f"`{run['command']}` ({run['machine']})" for run in record.get("runs", [record]))
    lines = [
        "# Contrastive search speed: cdlm vs greedy and transformers 4.55.4",
        "",
        f"{commands} — SmolLM2-135M-Instruct, float32, {record['threads']} torch "
        f"thread(s), penalty_alpha={record['penalty_alpha']}, {record['repeats']} (per run) "
        "rounds with the methods back to back in rotating order. Short prompts: 5-12 tokens; long: GSM8K 5-shot. "
        "Ratios: tokens/s of the first method over the second, median [min..max] over rounds; 'decode only' "
        "subtracts the round's prefill time (greedy with 1 new token) from both. A ratio whose (max-min)/median "
        f"exceeds {record['max_spread']} is inconclusive. cs = cdlm default (shared context), cs_per_row = B*k cache rows "
        "(4.55.4's layout), tf455 = transformers 4.55.4 built-in.",
        "",
        "| k x batch, new tokens | prompts (tokens) | load avg | tok/s (median [min..max]) | ratio | median [min..max] | verdict | identical |",
        "|---|---|---|---|---|---|---|:---:|",
    ]
    for r in results:
        tps = "; ".join(
            f"{m} {v['median']:.1f} [{v['min']:.1f}..{v['max']:.1f}]" for m, v in r["tokens_per_s"].items()
        )
        first = True
        for name, ratio in r["ratios"].items():
            lead = (
                f"| {r['top_k']}x{r['batch_size']}, {r['new_tokens_per_row']} new | {r['prompts']} ({r['prompt_tokens']['min']}-{r['prompt_tokens']['max']}) "
                f"| {r['load_average']['median']:.1f} [{r['load_average']['min']:.1f}..{r['load_average']['max']:.1f}] | {tps} "
                if first
                else "| | | | "
            )
            ident = (
                ("yes" if r["identical_tokens"] else "NO" if r["identical_tokens"] is not None else "-")
                if first
                else ""
            )
            lines.append(
                f"{lead}| {name} | {ratio['median']:.3f} [{ratio['min']:.3f}..{ratio['max']:.3f}] | {ratio['verdict']} | {ident} |"
            )
            first = False
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
