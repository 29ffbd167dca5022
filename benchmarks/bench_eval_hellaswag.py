"""HellaSwag with cdlm's eval harness on a real model: plain and contrastive scoring, resumable.

    python benchmarks/bench_eval_hellaswag.py --limit 1000 --amateur early-exit:7 --beta 0.5

One contrastive-scoring run with an early-exit amateur gives both scores per example from the same
forward passes: ``expert_loglikelihoods`` (plain scoring: the greedy/sample/cs row) and
``expert - beta * amateur`` (the cd row). The run folder (``runs/bench_eval/hellaswag-*``) is
resumable: rerun the same command after an interruption. Results go to
``benchmarks/results/eval_hellaswag.{json,md}``. Speed against lm-eval is measured side by side by
``benchmarks/lm_eval_agreement.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--amateur", default="early-exit:7")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_eval"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "eval_hellaswag"))
    args = parser.parse_args()

    from cdlm.decoding.methods import get_method
    from cdlm.eval_harness import EvalConfig, evaluate
    from cdlm.eval_harness.metrics import mean_and_stderr, multiple_choice_predictions
    from cdlm.eval_harness.evaluate import load_task_docs
    from cdlm.eval_harness.records import atomic_write_json, atomic_write_text
    from cdlm.models import load_amateur, load_model

    loaded = load_model(args.model, dtype="float32", device="cpu")
    amateur = load_amateur(args.amateur, loaded)
    method = get_method("cd")(loaded.model, loaded.tokenizer, amateur=amateur, beta=args.beta)
    config = EvalConfig(task="hellaswag", limit=args.limit, batch_size=args.batch_size)
    folder = Path(args.run_dir) / f"hellaswag-cd-{args.amateur.replace(':', '')}-beta{args.beta}"
    result = evaluate(loaded, method, config, folder)
    docs, _, _ = load_task_docs(config)
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    records.sort(key=lambda r: r["index"])
    plain = {"acc": [], "acc_norm": []}
    for record in records:
        doc = docs[record["index"]]
        pred, pred_norm = multiple_choice_predictions(record["expert_loglikelihoods"], doc["choices"])
        plain["acc"].append(float(pred == doc["gold"]))
        plain["acc_norm"].append(float(pred_norm == doc["gold"]))
    rows = []
    for label, metrics in (("loglikelihood (greedy/sample/cs)", plain), (f"contrastive (cd, {args.amateur}, beta={args.beta})", None)):
        for name in ("acc", "acc_norm"):
            if metrics is None:
                value, stderr = result["results"][name], result["results"][name + "_stderr"]
            else:
                value, stderr = mean_and_stderr(metrics[name])
            rows.append({"scoring": label, "metric": name, "value": value, "stderr": stderr})
    payload = {
        "model": args.model, "examples": len(records), "data": result["config"]["data_source"],
        "rows": rows, "examples_per_second": result["timing"]["examples_per_second"],
        "machine": "2-core CPU shared with other jobs", "command": " ".join(["python", *sys.argv]), "run": result,
    }
    atomic_write_json(args.output + ".json", payload)
    lines = [f"# HellaSwag ({args.model}, {len(records)} validation examples, zero-shot)", "",
             "| scoring | metric | value | stderr |", "|---|---|---|---|"]
    lines += [f"| {r['scoring']} | {r['metric']} | {r['value']:.4f} | {r['stderr']:.4f} |" for r in rows]
    lines += ["", f"examples/s (both scorings from one pass, 2-core shared CPU): {payload['examples_per_second']:.2f}",
              f"command: `{payload['command']}`", ""]
    atomic_write_text(args.output + ".md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
