"""``cdlm rl``: PPO with a LoRA policy on a rule-based or learned reward, optionally with contrastive rewards.

    cdlm rl --reward rule:gsm8k --contrastive-k 4 --iterations 10 --output-dir runs/ppo-cr

Prompts come from ``--prompts-file`` (JSON lines with a ``prompt`` field and any columns the reward
needs, e.g. ``answer``) or, by default, from synthetic arithmetic problems. With ``--contrastive-k K``
the offline baseline step samples K responses per prompt from the initial policy first (cached in
``--baseline-cache``, resumable) and PPO is trained on r - mean(baseline rewards).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdlm.cli.common import add_model_arguments, load_from_args, progress


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rl",
        help="PPO (LoRA policy, value head, KL to reference) with optional contrastive rewards",
        description="Train a policy with PPO; --contrastive-k K uses contrastive rewards (Shen et al., 2024).",
    )
    add_model_arguments(parser)
    parser.add_argument("--reward", required=True, help="'rule:gsm8k' or a folder with a sequence-classification reward model")
    parser.add_argument("--prompts-file", default=None, help="JSON lines with 'prompt' (+ e.g. 'answer'); default: synthetic arithmetic")
    parser.add_argument("--num-prompts", type=int, default=32, help="synthetic prompts when no --prompts-file (default: 32)")
    parser.add_argument("--contrastive-k", type=int, default=None, help="baseline responses per prompt; omit for plain rewards")
    parser.add_argument("--aggregate", default="mean", choices=["mean", "median", "max"], help="baseline aggregation (default: mean)")
    parser.add_argument("--normalize-rewards", action="store_true", help="divide contrastive rewards by their running std")
    parser.add_argument("--clip-rewards", type=float, default=None, help="clip contrastive rewards to [-c, c]")
    parser.add_argument("--baseline-cache", default=None, help="baseline cache file (default: OUTPUT_DIR/baselines.jsonl)")
    parser.add_argument("--baseline-temperature", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="cdlm-ppo")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap prompts in the chat template")
    parser.set_defaults(func=run)


def _read_rows(args: argparse.Namespace) -> list[dict]:
    from cdlm.alignment.rewards import arithmetic_problems

    if not args.prompts_file:
        return arithmetic_problems(args.num_prompts, seed=args.seed)
    path = Path(args.prompts_file)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {str(path)!r} not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{path} line {number}: expected a JSON object with a 'prompt' field")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def run(args: argparse.Namespace) -> int:
    from peft import LoraConfig

    from cdlm.alignment.baselines import BaselineSettings, generate_baselines
    from cdlm.alignment.ppo import PPOConfig, PPOTrainer
    from cdlm.alignment.rewards import ContrastiveReward, load_reward

    if args.contrastive_k is not None and args.contrastive_k < 1:
        raise ValueError(f"--contrastive-k must be >= 1 (got {args.contrastive_k}); omit it for plain rewards")
    # Validate everything cheap before loading the model.
    config = PPOConfig(
        output_dir=args.output_dir, num_iterations=args.iterations, rollout_batch_size=args.rollout_batch_size,
        mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs, learning_rate=args.learning_rate,
        kl_coef=args.kl_coef, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        use_chat_template=args.chat, save_steps=args.save_steps, seed=args.seed,
    )
    rows = _read_rows(args)
    reward = load_reward(args.reward)
    loaded = load_from_args(args)
    if args.contrastive_k is not None:
        settings = BaselineSettings(
            k=args.contrastive_k, max_new_tokens=args.max_new_tokens, temperature=args.baseline_temperature,
            seed=args.seed, use_chat_template=args.chat, model=args.model,
        )
        cache_path = Path(args.baseline_cache or Path(args.output_dir) / "baselines.jsonl")
        progress(f"offline baselines: k={args.contrastive_k} responses for {len(rows)} prompts -> {cache_path}")
        cache = generate_baselines(loaded.model, loaded.tokenizer, rows, reward, cache_path, settings,
                                   batch_size=max(args.rollout_batch_size, args.contrastive_k), progress=progress)
        reward = ContrastiveReward(reward, cache, aggregate=args.aggregate, normalize=args.normalize_rewards, clip=args.clip_rewards)

    def report(record: dict) -> None:
        progress(f"iteration {int(record['step'])}: reward {record['reward_raw']:.3f} score {record['score']:+.3f} "
                 f"kl {record['kl']:.3f} entropy {record['policy/entropy']:.2f} ({record['seconds']:.0f}s)")

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    trainer = PPOTrainer(loaded.model, config, loaded.tokenizer, reward, rows, peft_config=lora, callbacks=[report])
    history = trainer.train(resume_from_checkpoint=True if args.resume else None)
    final = trainer.latest_checkpoint()
    print(json.dumps({"iterations": len(history), "final_reward": history[-1]["reward_raw"] if history else None,
                      "checkpoint": str(final)}))
    return 0
