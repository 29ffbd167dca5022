"""Likelihood displacement on real data: does removing high-CHES pairs help, and does CHES rank pairs by displacement?

Razin et al., "Unintentional Unalignment" (ICLR 2025) show that DPO lowers the preferred reply's likelihood mostly
because of pairs whose preferred and dispreferred replies have similar hidden embeddings (high CHES), and that
removing those pairs mitigates it. This script checks both claims at CPU scale, with LoRA on SmolLM2-135M-Instruct
and the shipped HH-RLHF harmless-base pairs, for DPO, APO-zero and CPO:

1. **Filtering.** CHES of every pair in the training pool (:func:`cdlm.alignment.preference.ches.score_pairs`). Three
   runs per objective with the same budget (steps, batch, learning rate, seed): all pairs; the ``--drop-fraction``
   highest-CHES pairs removed; the same number removed at random. On the held-out pairs (the shipped ``test`` split):
   fraction of pairs whose chosen log-probability decreased, its mean change, the rejected one's mean change, and
   reward accuracy (implicit reward beta*(log pi - log pi_ref), ties = 1/2).
2. **Ranking.** ``--single-pairs`` pairs spread over the CHES range are each trained on alone (``--single-steps``
   steps); Spearman correlation between a pair's CHES (and length-normalised CHES) and the change of its own chosen
   log-probability. The paper's claim predicts a negative correlation (higher CHES, larger drop).

Log-probability changes are measured against the step-0 policy, which is the reference (fresh LoRA adapter), with
:func:`cdlm.alignment.preference.displacement.displacement_metrics`, the function the trainers' displacement logging
uses. Finished runs are kept in ``--work-dir`` so an interrupted run continues.

    HF_HUB_OFFLINE=1 python benchmarks/displacement_demo.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

from _machine import describe_machine
from train_preferences import select_shortest  # the same fixed, tokenizer-free choice of short pairs

MACHINE = describe_machine()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results"
OBJECTIVES = ("dpo", "apo_zero", "cpo")
CONDITIONS = ("all", "ches_filtered", "random_filtered")


def make_trainer(base_model, tokenizer, method: str, train, args, steps: int, batch_size: int):
    from peft import LoraConfig

    from cdlm.alignment.preference.config import PreferenceConfig
    from cdlm.alignment.preference.trainer import PreferenceTrainer

    config = PreferenceConfig(
        output_dir=str(Path(args.work_dir) / "trainer"),
        method=method,
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=8,
        max_length=args.max_length,
        logging_steps=steps,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        seed=args.seed,
        disable_tqdm=True,
        displacement_pairs=0,  # measured below on the whole held-out set, once, with the same function
    )
    return PreferenceTrainer(
        copy.deepcopy(base_model),
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", lora_dropout=0.0
        ),
    )


def held_out_metrics(trainer, held_out, reference_logps) -> dict:
    from cdlm.alignment.preference.displacement import displacement_metrics

    metrics = trainer.preference_metrics(held_out, reference_logps=reference_logps)
    policy, reference = trainer.last_preference_logps
    metrics.update(displacement_metrics(reference, policy))
    return metrics


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument(
        "--train-pairs", type=int, default=48, help="training pool: the shortest pairs of the train split"
    )
    parser.add_argument("--eval-pairs", type=int, default=32, help="held-out: the shortest pairs of the test split")
    parser.add_argument("--drop-fraction", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--single-pairs", type=int, default=8, help="pairs trained on alone for the ranking check (0 = skip)"
    )
    parser.add_argument("--single-steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, more threads spin)")
    parser.add_argument("--work-dir", default="/tmp/cdlm_displacement_demo")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cdlm.alignment.preference.ches import CHESSettings, score_pairs, top_fraction
    from cdlm.alignment.preference.data import load_default_splits
    from cdlm.models import load_model

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    settings_key = {k: v for k, v in vars(args).items() if k not in ("threads", "work_dir", "objectives")}
    runs_path = work / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    if runs.get("settings") not in (None, settings_key):
        raise SystemExit(f"{runs_path} holds runs with other settings; use another --work-dir")
    runs["settings"] = settings_key

    def save_runs() -> None:
        runs_path.write_text(json.dumps(runs, indent=1))

    train_all, test_all = load_default_splits()
    pool, held_out = select_shortest(train_all, args.train_pairs), select_shortest(test_all, args.eval_pairs)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    base, tokenizer = loaded.model, loaded.tokenizer

    start = time.perf_counter()
    records = score_pairs(
        base,
        tokenizer,
        pool,
        settings=CHESSettings(max_length=args.max_length),
        batch_size=8,
        output_dir=work / "ches",
    )
    ches_seconds = time.perf_counter() - start
    dropped_ches = top_fraction(records, args.drop_fraction, score="ches")
    rng = random.Random(args.seed)
    dropped_random = sorted(rng.sample(range(len(pool)), len(dropped_ches)))
    subsets = {
        "all": list(range(len(pool))),
        "ches_filtered": [i for i in range(len(pool)) if i not in set(dropped_ches)],
        "random_filtered": [i for i in range(len(pool)) if i not in set(dropped_random)],
    }
    print(
        f"CHES of {len(pool)} pairs in {ches_seconds:.0f}s; dropping {len(dropped_ches)} (top CHES / random)",
        flush=True,
    )

    by_ches = sorted((r for r in records if "skipped" not in r), key=lambda r: r["ches"])
    spacing = (len(by_ches) - 1) / max(1, args.single_pairs - 1)
    single_rows = (
        sorted({by_ches[round(k * spacing)]["index"] for k in range(args.single_pairs)}) if args.single_pairs else []
    )
    # DPO's whole picture first, then the other objectives' filtering runs, then their ranking checks: whatever
    # finishes in the time available is the most useful part.
    first, rest = args.objectives[:1], args.objectives[1:]
    tasks = [(m, "filter") for m in first] + [(m, "single") for m in first]
    tasks += [(m, "filter") for m in rest] + [(m, "single") for m in rest]
    state = {"reference_logps": None}

    def publish() -> None:
        runs_path.write_text(json.dumps(runs, indent=1))
        write_results(args, runs, records, dropped_ches, dropped_random, ches_seconds, quiet=True)

    for method, kind in tasks:
        if kind == "filter":
            for condition in CONDITIONS:
                key = f"{method}/{condition}"
                if key in runs:
                    continue
                train = pool.select(subsets[condition])
                trainer = make_trainer(base, tokenizer, method, train, args, args.steps, args.batch_size)
                if state["reference_logps"] is None:
                    trainer.preference_metrics(held_out)  # step 0: the policy is the reference (LoRA B = 0)
                    state["reference_logps"] = trainer.last_preference_logps[1]
                began = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - began
                runs[key] = {
                    "train_pairs": len(subsets[condition]),
                    "steps": trainer.state.global_step,
                    "train_seconds": round(seconds, 1),
                    "load_average_after": round(os.getloadavg()[0], 2),
                    "held_out": held_out_metrics(trainer, held_out, state["reference_logps"]),
                }
                del trainer
                publish()
                print(key, json.dumps(runs[key]["held_out"]), flush=True)
            continue
        for index in single_rows:
            key = f"{method}/single/{index}"
            if key in runs:
                continue
            pair = pool.select([index])
            trainer = make_trainer(base, tokenizer, method, pair, args, args.single_steps, 1)
            trainer.preference_metrics(pair)
            before = trainer.last_preference_logps[1]
            trainer.train()
            trainer.preference_metrics(pair, reference_logps=before)
            after = trainer.last_preference_logps[0]
            runs[key] = {
                "index": index,
                "ches": records[index]["ches"],
                "ches_normalized": records[index]["ches_normalized"],
                "chosen_logps_change": float(after[0, 0] - before[0, 0]),
                "rejected_logps_change": float(after[0, 1] - before[0, 1]),
            }
            del trainer
            publish()
            print(key, json.dumps(runs[key]), flush=True)

    write_results(args, runs, records, dropped_ches, dropped_random, ches_seconds)


def write_results(
    args, runs: dict, records: list[dict], dropped_ches, dropped_random, ches_seconds: float, quiet: bool = False
) -> None:
    import statistics

    summary: dict = {
        "model": args.model,
        "settings": runs["settings"],
        "machine": MACHINE,
        "finished": all(f"{m}/{c}" in runs for m in args.objectives for c in CONDITIONS)
        and all(
            sum(k.startswith(f"{m}/single/") for k in runs) >= min(args.single_pairs, len(records))
            for m in args.objectives
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "ches_seconds": round(ches_seconds, 1),
        "pool_pairs": len(records),
        "dropped": len(dropped_ches),
        "dropped_ches_indices": dropped_ches,
        "dropped_random_indices": dropped_random,
        "ches_median": statistics.median(r["ches"] for r in records if "skipped" not in r),
        "filtering": {},
        "ranking": {},
    }
    for method in args.objectives:
        summary["filtering"][method] = {c: runs[f"{method}/{c}"] for c in CONDITIONS if f"{method}/{c}" in runs}
        singles = [v for k, v in runs.items() if k.startswith(f"{method}/single/")]
        if len(singles) >= 3:
            change = [s["chosen_logps_change"] for s in singles]
            summary["ranking"][method] = {
                "pairs": len(singles),
                "spearman_ches_vs_chosen_change": spearman([s["ches"] for s in singles], change),
                "spearman_ches_normalized_vs_chosen_change": spearman([s["ches_normalized"] for s in singles], change),
                "fraction_chosen_decreased": sum(c < 0 for c in change) / len(change),
                "singles": singles,
            }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "displacement.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / "displacement.md").write_text(markdown(summary))
    if not quiet:
        print(markdown(summary))


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        "# Likelihood displacement and CHES filtering (SmolLM2-135M-Instruct, LoRA, HH-RLHF harmless-base)",
        "",
        f"Training pool: the {summary['pool_pairs']} shortest pairs of the shipped `train` split; held-out: the "
        f"{s['eval_pairs']} shortest of its `test` split. Every run: {s['steps']} steps, batch {s['batch_size']}, "
        f"lr {s['lr']} (constant), beta {s['beta']}, LoRA r {s['lora_r']}, max_length {s['max_length']}, "
        f"seed {s['seed']}. Filtered runs drop {summary['dropped']} pairs ({s['drop_fraction']:.0%}): the highest "
        f"CHES, or random ones (seed {s['seed']}). Changes are against the step-0 policy (= the reference). Accuracy: "
        "implicit reward, ties = 1/2.",
        "",
        "| objective | training pairs | held-out chosen log-prob fell (fraction) | mean chosen log-prob change | "
        "mean rejected log-prob change | held-out reward accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, conditions in summary["filtering"].items():
        for condition, run in conditions.items():
            h = run["held_out"]
            lines.append(
                f"| {method} | {condition.replace('_', ' ')} ({run['train_pairs']}) | "
                f"{h['displacement/chosen_decreased_fraction']:.2f} | {h['displacement/chosen_logps_change']:+.2f} | "
                f"{h['displacement/rejected_logps_change']:+.2f} | {h['reward_accuracy']:.2f} |"
            )
    if summary["ranking"]:
        lines += [
            "",
            f"Ranking check (the paper's): pairs spread over the CHES range, each trained on alone for "
            f"{s['single_steps']} steps; Spearman correlation between the pair's score and the change of its own "
            "chosen log-probability (the paper predicts < 0: higher CHES, larger drop).",
            "",
            "| objective | pairs | Spearman(CHES, chosen change) | Spearman(length-normalised CHES, chosen change) "
            "| chosen fell (fraction) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method, r in summary["ranking"].items():
            lines.append(
                f"| {method} | {r['pairs']} | {r['spearman_ches_vs_chosen_change']:+.2f} | "
                f"{r['spearman_ches_normalized_vs_chosen_change']:+.2f} | {r['fraction_chosen_decreased']:.2f} |"
            )
    if not summary["finished"]:
        lines += [
            "",
            "**Partial**: the run stopped before every objective's runs finished; missing rows were not run.",
        ]
    lines += [
        "",
        f"Machine: {summary['machine']}. CHES scoring of the pool: {summary['ches_seconds']} s.",
        f"Command: `{summary['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
