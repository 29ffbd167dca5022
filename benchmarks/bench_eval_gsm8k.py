"""GSM8K (lm-eval ``gsm8k`` 5-shot or ``gsm8k_cot`` 8-shot) with several decoding methods, resumable.

    nohup timeout 36000 python benchmarks/bench_eval_gsm8k.py --limit 100 --methods greedy,cd,cs,cid &

Every method runs on the same problems through ``cdlm.eval_harness.evaluate`` into its own run folder
under ``runs/bench_eval/`` (rerun the same command to continue after an interruption); the table goes
to ``benchmarks/results/eval_gsm8k.{json,md}`` and a bar chart to ``eval_gsm8k.png``. Methods that are
not importable yet are skipped with a note. Contrastive methods use ``--amateur`` (default
``early-exit:7``); ``cid`` contrasts the few-shot prompt with the bare question.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="gsm8k", choices=["gsm8k", "gsm8k_cot"])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--methods", default="greedy,cd,cs,cid")
    parser.add_argument("--amateur", default="early-exit:7")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_eval"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "eval_gsm8k"))
    args = parser.parse_args()

    from cdlm.decoding.methods import get_method
    from cdlm.eval_harness import EvalConfig, evaluate
    from cdlm.eval_harness.records import atomic_write_json, atomic_write_text
    from cdlm.eval_harness.report import markdown_table, plot
    from cdlm.models import load_amateur, load_model

    loaded = load_model(args.model, dtype="float32", device="cpu")
    config = EvalConfig(task=args.task, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    results, skipped = [], {}
    amateur = None
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        try:
            method_class = get_method(name)
        except (ImportError, AttributeError) as error:
            skipped[name] = f"not importable: {error}"
            continue
        kwargs = {}
        if method_class.needs_amateur:
            amateur = amateur or load_amateur(args.amateur, loaded)
            kwargs["amateur"] = amateur
        method = method_class(loaded.model, loaded.tokenizer, **kwargs)
        folder = Path(args.run_dir) / f"{args.task}-{name}"
        results.append(evaluate(loaded, method, config, folder))
        table = markdown_table(results)
        header = (f"# {args.task} on {args.model} ({args.limit} test problems, 2-core CPU shared with other jobs)\n\n"
                  f"command: `python {' '.join(sys.argv)}`\n\n")
        atomic_write_text(args.output + ".md", header + table + "".join(f"\nskipped {k}: {v}\n" for k, v in skipped.items()))
        atomic_write_json(args.output + ".json", {"runs": results, "skipped": skipped, "command": " ".join(sys.argv)})
        plot(results, args.output + ".png", title=f"{args.task}, {args.model}, n={args.limit}")
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
