"""Real preference-training runs: LoRA on SmolLM2-135M-Instruct, HH-RLHF harmless-base pairs, each objective.

For each method this trains a LoRA adapter on the shipped set's ``train`` split (the ``--train-pairs`` shortest pairs)
and measures held-out preference metrics on its fixed ``test`` split (the ``--eval-pairs`` shortest pairs) before and
after (defaults sized for a shared 2-core CPU):

* ``reward_accuracy`` / ``reward_margin``: sequence-level implicit reward beta*(log pi - log pi_ref), ties = 1/2
  (before training the policy *is* the reference, so every pair ties: 0.5 and 0.0);
* ``logratio_accuracy`` / ``logratio_margin``: reference-free log pi(y_w) - log pi(y_l) (CPO's implicit reward).

Results: ``benchmarks/results/alignment_train_<method>.json``; ``--summarize`` writes ``alignment_train.md`` and
``alignment_train.png`` (loss curves, SparsePO mask sparsity) from those files.

    HF_HUB_OFFLINE=1 python benchmarks/train_preferences.py --method dpo
    HF_HUB_OFFLINE=1 python benchmarks/train_preferences.py --summarize
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _machine import describe_machine

MACHINE = describe_machine()  # taken at start, before this run loads the cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dpo", "apo_zero", "apo_down", "cpo", "sparsepo")


def select_shortest(dataset, n: int):
    """The ``n`` pairs with the shortest prompt+chosen+rejected text (ties by position): a fixed, tokenizer-free
    choice that keeps CPU runs short. Returned in their original order."""
    lengths = [len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in dataset]
    keep = sorted(sorted(range(len(dataset)), key=lambda i: (lengths[i], i))[:n])
    return dataset.select(keep)


def run(method: str, args: argparse.Namespace, cache: dict) -> dict:
    import torch
    from peft import LoraConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    from cdlm.alignment.preference.config import PreferenceConfig
    from cdlm.alignment.preference.data import load_default_splits
    from cdlm.alignment.preference.trainer import PreferenceTrainer
    from cdlm.models import load_model

    torch.manual_seed(0)
    train, test = load_default_splits()
    train, test = select_shortest(train, args.train_pairs), select_shortest(test, args.eval_pairs)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    extra = {}
    if method == "sparsepo":
        extra = dict(
            sparsepo_mask_type=args.mask_type,
            sparsepo_mask_l1=args.mask_l1 if args.mask_type == "learned" else 0.0,  # activation masks have no L1
            sparsepo_layers=args.mask_layers,
        )
    config = PreferenceConfig(
        output_dir=str(Path(args.work_dir) / method),
        method=method,
        beta=args.beta,
        cpo_alpha=args.cpo_alpha,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = PreferenceTrainer(
        loaded.model,
        args=config,
        train_dataset=train,
        processing_class=loaded.tokenizer,
        peft_config=LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", lora_dropout=0.0
        ),
    )
    # Before training the policy is the reference (LoRA B = 0), the same for every method: measure it once.
    if "before" not in cache:
        start = time.perf_counter()
        cache["before"] = trainer.preference_metrics(test)
        cache["reference_logps"] = trainer.last_preference_logps[1]
        cache["eval_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    after = trainer.preference_metrics(test, reference_logps=cache["reference_logps"])
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "method": method,
        "model": args.model,
        "train_pairs": len(trainer.train_dataset),
        "pairs_seen": trainer.state.global_step * args.batch_size,
        "train_data_report": trainer.train_data_report.summary() if trainer.train_data_report else None,
        "eval_pairs": cache["before"]["pairs"],
        "steps": trainer.state.global_step,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "beta": args.beta,
        "learning_rate": args.lr,
        "lora_r": args.lora_r,
        "extra": extra,
        "before": cache["before"],
        "after": after,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, trainer.state.global_step), 2),
        "eval_seconds_reference_and_before": cache["eval_seconds"],
        "history": history,
        "machine": MACHINE,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"alignment_train_{method}.json").write_text(json.dumps(result, indent=1))
    print(
        json.dumps({k: result[k] for k in ("method", "steps", "train_seconds", "before", "after")}, indent=1),
        flush=True,
    )
    return result


def summarize() -> None:
    rows = []
    for method in METHODS:
        path = RESULTS / f"alignment_train_{method}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    if not rows:
        raise SystemExit("no alignment_train_*.json results yet")
    lines = [
        "# Preference training on SmolLM2-135M-Instruct (LoRA, HH-RLHF harmless-base)",
        "",
        f"Held-out: the shipped set's fixed `test` split ({rows[0]['eval_pairs']} pairs). "
        f"Machine: {'; '.join(sorted({row['machine'] for row in rows}))}.",
        "Accuracy counts ties as 1/2; before training the policy equals the reference (LoRA B = 0), so the implicit",
        "reward ties on every pair (0.5, margin 0). `logratio` = reference-free log pi(y_w) - log pi(y_l) (CPO's reward).",
        "",
        "| method | steps | pairs seen | batch | lr | beta | train s | reward acc before -> after | reward margin before -> after | logratio acc before -> after | logratio margin before -> after | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b, a, h = r["before"], r["after"], r["history"]
        lines.append(
            f"| {r['method']}{' (' + r['extra'].get('sparsepo_mask_type', '') + ' masks)' if r['method'] == 'sparsepo' else ''} "
            f"| {r['steps']} | {r['pairs_seen']} | {r['batch_size']} | {r['learning_rate']} | {r['beta']} | {r['train_seconds']} "
            f"| {b['reward_accuracy']:.3f} -> **{a['reward_accuracy']:.3f}** | {b['reward_margin']:.3f} -> {a['reward_margin']:.3f} "
            f"| {b['logratio_accuracy']:.3f} -> {a['logratio_accuracy']:.3f} | {b['logratio_margin']:.2f} -> {a['logratio_margin']:.2f} "
            f"| {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f} |"
        )
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    sparse = [r for r in rows if r["method"] == "sparsepo"]
    if sparse:
        spars = [e.get("mask/sparsity") for e in sparse[0]["history"] if "mask/sparsity" in e]
        if spars:
            lines += [
                "",
                f"SparsePO mask sparsity (fraction of completion tokens with mask exactly 0): first step {spars[0]:.3f}, last step {spars[-1]:.3f}.",
            ]
    (RESULTS / "alignment_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3 if sparse else 2, figsize=(15 if sparse else 10, 4))
    for r in rows:
        steps = [e["step"] for e in r["history"]]
        axes[0].plot(steps, [e["loss"] for e in r["history"]], label=r["method"])
        axes[1].plot(steps, [e.get("rewards/margins", float("nan")) for e in r["history"]], label=r["method"])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="train reward margin (method's own reward)", xlabel="step")
    axes[0].legend()
    if sparse:
        h = sparse[0]["history"]
        axes[2].plot([e["step"] for e in h], [e.get("mask/sparsity", float("nan")) for e in h], label="sparsity")
        axes[2].plot([e["step"] for e in h], [e.get("mask/mean", float("nan")) for e in h], label="mean mask")
        axes[2].set(title="SparsePO mask", xlabel="step")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "alignment_train.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, action="append")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--train-pairs", type=int, default=200)
    parser.add_argument("--eval-pairs", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--cpo-alpha", type=float, default=1.0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--mask-type", default="learned")
    parser.add_argument("--mask-l1", type=float, default=0.01)
    parser.add_argument("--mask-layers", type=int, nargs="*", default=[-8, -4, -1])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--work-dir", default="/tmp/cdlm_train_preferences")
    args = parser.parse_args()
    cache: dict = {}
    for method in args.method or ([] if args.summarize else METHODS):
        run(method, args, cache)
    if args.summarize:
        summarize()


if __name__ == "__main__":
    main()
