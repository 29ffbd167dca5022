"""PPO with plain vs contrastive rewards on SmolLM2-135M-Instruct, verifiable arithmetic rewards.

Both runs start from the same LoRA-initialised policy, see the same prompts in the same order with the
same sampling seeds and hyperparameters; the only difference is the reward fed to PPO: the rule
reward r (1 if the final number is right) or the contrastive reward r - mean_k r(baseline_k)
(Shen et al., 2024) with k baseline responses per prompt sampled offline from the initial policy.
Reported: per-iteration raw reward and KL to the reference, and held-out greedy accuracy of the
initial policy and both trained policies, plus the per-prompt win rate of contrastive over plain.

    HF_HUB_OFFLINE=1 python benchmarks/ppo_demo.py --iterations 10 --train-prompts 16 --eval-prompts 32 \
        --rollout-batch-size 8 --mini-batch-size 4 --ppo-epochs 2 --learning-rate 1e-4

Writes benchmarks/results/ppo_demo.{json,md,png} (~20 min on a busy 2-core CPU with --threads 1; the
baseline cache in --work-dir is reused by later runs with the same settings). The numbers from such
small runs are noisy: treat them as a demonstration that both variants run, not as a verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _machine import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--train-prompts", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="baseline responses per prompt")
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy shared CPU)"
    )
    parser.add_argument("--work-dir", default="/tmp/cdlm_ppo_demo")
    parser.add_argument("--output", default=str(RESULTS / "ppo_demo"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import LoraConfig

    from cdlm.alignment.rl.baselines import BaselineSettings, generate_baselines
    from cdlm.alignment.rl.problems import arithmetic_problems
    from cdlm.alignment.rl.rewards import ContrastiveReward, GSM8KReward
    from cdlm.alignment.rl.rollout import render_prompts, sample_responses
    from cdlm.alignment.rl.trainer import ContrastivePPOConfig, ContrastivePPOTrainer
    from cdlm.models import load_model

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_rows = arithmetic_problems(args.train_prompts, args.seed)
    eval_rows = arithmetic_problems(args.eval_prompts, args.seed + 1000)
    train_keys = {row["prompt"] for row in train_rows}
    eval_rows = [row for row in eval_rows if row["prompt"] not in train_keys]
    reward = GSM8KReward()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": vars(args), "machine": describe_machine(), "runs": {}}

    def save() -> None:
        output.with_suffix(".json").write_text(json.dumps(results, indent=1), encoding="utf-8")

    def held_out(model, tokenizer) -> list[float]:
        scores = []
        for start in range(0, len(eval_rows), 16):
            chunk = eval_rows[start : start + 16]
            prompts = [r["prompt"] for r in chunk]
            rollout = sample_responses(
                model,
                tokenizer,
                render_prompts(tokenizer, prompts, True),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
            scores += reward(prompts, rollout.texts, answer=[r["answer"] for r in chunk])
        return scores

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    log("held-out accuracy of the initial policy")
    initial_scores = held_out(model, tokenizer)
    results["initial_heldout_accuracy"] = sum(initial_scores) / len(initial_scores)
    log(f"initial held-out accuracy {results['initial_heldout_accuracy']:.3f}")

    log(f"offline baselines: k={args.k} for {len(train_rows)} prompts")
    t0 = time.perf_counter()
    settings = BaselineSettings(
        k=args.k, max_new_tokens=args.max_new_tokens, temperature=0.7, seed=args.seed, model=args.model
    )
    cache = generate_baselines(
        model, tokenizer, train_rows, reward, work / "baselines.jsonl", settings, batch_size=16, progress=log
    )
    baseline_means = [sum(cache[r["prompt"]]) / args.k for r in train_rows]
    results["baselines"] = {
        "seconds": time.perf_counter() - t0,
        "mean_reward": sum(baseline_means) / len(baseline_means),
        "per_prompt_mean": baseline_means,
    }
    save()
    del model

    heldout_scores = {}
    for name in ("plain", "contrastive"):
        policy, tokenizer = load_model(args.model)
        torch.manual_seed(args.seed)  # identical LoRA initialisation for both runs
        run_reward = ContrastiveReward(reward, cache) if name == "contrastive" else reward
        config = ContrastivePPOConfig(
            output_dir=str(work / name),
            num_iterations=args.iterations,
            rollout_batch_size=args.rollout_batch_size,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.ppo_epochs,
            learning_rate=args.learning_rate,
            kl_coef=args.kl_coef,
            max_new_tokens=args.max_new_tokens,
            temperature=0.7,
            seed=args.seed,
        )
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
        history: list[dict] = []
        results["runs"][name] = {"history": history}

        def on_step(record: dict, name=name, history=history) -> None:
            history.append(record)
            log(
                f"{name} it {int(record['step'])}: reward {record['reward_raw']:.3f} score {record['score']:+.3f} "
                f"kl {record['kl']:.3f} entropy {record['policy/entropy']:.2f} ({record['seconds']:.0f}s)"
            )
            save()

        trainer = ContrastivePPOTrainer(
            policy, config, tokenizer, run_reward, train_rows, peft_config=lora, callbacks=[on_step]
        )
        t0 = time.perf_counter()
        trainer.train()
        scores = held_out(trainer.model, tokenizer)
        heldout_scores[name] = scores
        results["runs"][name].update(
            {
                "train_seconds": time.perf_counter() - t0,
                "heldout_accuracy": sum(scores) / len(scores),
                "mean_train_reward": sum(h["reward_raw"] for h in history) / len(history),
                "mean_train_reward_last_half": sum(h["reward_raw"] for h in history[len(history) // 2 :])
                / max(1, len(history) - len(history) // 2),
                "final_kl": history[-1]["kl"],
            }
        )
        log(f"{name}: held-out accuracy {results['runs'][name]['heldout_accuracy']:.3f}")
        save()
        del trainer, policy

    plain, contrastive = heldout_scores["plain"], heldout_scores["contrastive"]
    wins = sum(c > p for c, p in zip(contrastive, plain))
    losses = sum(c < p for c, p in zip(contrastive, plain))
    results["contrastive_vs_plain"] = {
        "wins": wins,
        "losses": losses,
        "ties": len(plain) - wins - losses,
        "win_rate_ties_half": (wins + 0.5 * (len(plain) - wins - losses)) / len(plain),
    }
    results["total_seconds"] = time.perf_counter() - started
    save()
    write_report(results, output, len(eval_rows))
    log(f"done in {results['total_seconds']:.0f}s -> {output}.json/.md/.png")
    return 0


def write_report(results: dict, output: Path, eval_count: int) -> None:
    runs = results["runs"]
    lines = [
        "# PPO: plain vs contrastive rewards (SmolLM2-135M-Instruct, LoRA, arithmetic rule reward)",
        "",
        f"Machine: {results['machine']}. Config: `{json.dumps(results['config'])}`.",
        "",
        f"Initial policy held-out greedy accuracy: {results['initial_heldout_accuracy']:.3f} ({eval_count} prompts); "
        f"baseline (k={results['config']['k']}, T=0.7) mean reward on train prompts: {results['baselines']['mean_reward']:.3f}.",
        "",
        "| run | mean train reward | train reward, last half | final KL | held-out accuracy | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['mean_train_reward']:.3f} | {run['mean_train_reward_last_half']:.3f} | "
            f"{run['final_kl']:.3f} | {run['heldout_accuracy']:.3f} | {run['train_seconds']:.0f} |"
        )
    versus = results["contrastive_vs_plain"]
    lines += [
        "",
        f"Held-out per-prompt comparison, contrastive vs plain: {versus['wins']} wins, {versus['losses']} losses, "
        f"{versus['ties']} ties (win rate with ties as half: {versus['win_rate_ties_half']:.3f}).",
        "",
    ]
    output.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        steps = [h["step"] for h in run["history"]]
        axes[0].plot(steps, [h["reward_raw"] for h in run["history"]], marker="o", label=name)
        axes[1].plot(steps, [h["kl"] for h in run["history"]], marker="o", label=name)
    axes[0].set(title="rollout reward (rule, raw)", xlabel="PPO iteration", ylabel="mean reward")
    axes[1].set(title="KL(policy || reference), summed over tokens", xlabel="PPO iteration", ylabel="KL")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
