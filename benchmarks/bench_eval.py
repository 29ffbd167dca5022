"""GSM8K or HellaSwag with several decoding methods on the same examples, resumable.

    python benchmarks/bench_eval.py --task gsm8k --limit 100 --methods greedy,cs,cd,cid
    python benchmarks/bench_eval.py --task hellaswag --limit 1000 --methods greedy,cd,cid

Every method runs through ``cdlm.eval_harness.evaluate`` into its own run folder under
``runs/bench_eval/<task>-<method>`` (rerun the same command to continue after an interruption); the
table goes to ``benchmarks/results/eval_<task>.{json,md}`` and a bar chart to ``eval_<task>.png``.
Contrastive methods use ``--amateur`` (default ``early-exit:7``). On GSM8K ``cid`` contrasts the
few-shot prompt with the bare question; on HellaSwag ``cd`` is contrastive scoring (expert minus
beta x amateur log-likelihood), ``cid`` contrasts the context with its activity label, and
greedy / sample / cs all score by plain log-likelihood (so only ``greedy`` is worth running).
Speed against lm-eval is measured side by side by ``benchmarks/lm_eval_agreement.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _machine import describe_machine

from cdlm.eval_harness.task import task_names

MACHINE = describe_machine()  # taken at start, before this run loads the cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="gsm8k", choices=task_names())
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--methods", default="greedy,cd,cs,cid")
    parser.add_argument("--amateur", default="early-exit:7")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_eval"))
    parser.add_argument(
        "--output", default=None, help="results path without suffix (default: benchmarks/results/eval_<task>)"
    )
    args = parser.parse_args()
    output = args.output or str(ROOT / "benchmarks" / "results" / f"eval_{args.task}")

    from cdlm.decoding.methods import get_method
    from cdlm.eval_harness import EvalConfig, evaluate
    from cdlm.eval_harness.report import markdown_table, plot
    from cdlm.models import load_amateur, load_model
    from cdlm.runs import atomic_write_json, atomic_write_text

    loaded = load_model(args.model, dtype="float32", device="cpu")
    config = EvalConfig(
        task=args.task, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
    )
    command = " ".join(["python", *sys.argv])
    results = []
    amateur = None
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method_class = get_method(name)
        kwargs = {}
        if method_class.needs_amateur:
            amateur = amateur or load_amateur(args.amateur, loaded)
            kwargs["amateur"] = amateur
        method = method_class(loaded.model, loaded.tokenizer, **kwargs)
        results.append(evaluate(loaded, method, config, Path(args.run_dir) / f"{args.task}-{name}"))
        table = markdown_table(results)
        examples = results[0]["n_samples"]
        header = f"# {args.task} on {args.model} ({examples} examples; {MACHINE})\n\ncommand: `{command}`\n\n"
        atomic_write_text(output + ".md", header + table)
        atomic_write_json(output + ".json", {"runs": results, "machine": MACHINE, "command": command})
        plot(results, output + ".png", title=f"{args.task}, {args.model}, n={examples}")
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
