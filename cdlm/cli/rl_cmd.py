"""cdlm rl: PPO with a LoRA policy on a rule-based or learned reward, optionally with contrastive rewards.

    cdlm rl --reward rule:gsm8k --contrastive-k 4 --num-iterations 10 --output-dir runs/ppo-cr

Prompts come from --prompts-file (JSON lines with a "prompt" field and any columns the reward needs,
e.g. "answer") or, by default, from synthetic arithmetic problems. With --contrastive-k K the offline
baseline step samples K responses per prompt from the initial policy when an iteration first uses the
prompt (cached in --baseline-cache with the reward and answers that scored them; resumable) and PPO is
trained on r - mean(baseline rewards). Settings: ContrastivePPOConfig defaults < --config
YAML < flags; rerunning into the same --output-dir resumes after checking the settings.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from cdlm.cli.common import add_model_arguments, is_main_process, load_from_args, progress
from cdlm.cli.training import TrainingCommand


@dataclass
class RewardArguments:
    """The reward, the prompts, and the contrastive-reward baselines of ``cdlm rl``."""

    reward: str | None = field(
        default=None,
        metadata={"help": "'rule:gsm8k' or a folder with a sequence-classification reward model (required)"},
    )
    prompts_file: str | None = field(
        default=None, metadata={"help": "JSON lines with 'prompt' (+ e.g. 'answer'); default: synthetic arithmetic"}
    )
    num_prompts: int = field(default=32, metadata={"help": "synthetic prompts when no --prompts-file"})
    contrastive_k: int | None = field(
        default=None, metadata={"help": "baseline responses per prompt for contrastive rewards; none: plain rewards"}
    )
    aggregate: str = field(
        default="mean", metadata={"help": "how baseline rewards are aggregated", "choices": ("mean", "median", "max")}
    )
    normalize_rewards: bool = field(
        default=False, metadata={"help": "divide contrastive rewards by their running std"}
    )
    clip_rewards: float | None = field(default=None, metadata={"help": "clip contrastive rewards to [-c, c]"})
    baseline_cache: str | None = field(
        default=None, metadata={"help": "baseline cache file (default: OUTPUT_DIR/baselines.jsonl)"}
    )
    baseline_temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of the baseline responses"}
    )

    def __post_init__(self) -> None:
        if self.contrastive_k is not None and self.contrastive_k < 1:
            raise ValueError(
                f"contrastive_k must be >= 1 (got {self.contrastive_k}); leave it unset for plain rewards"
            )
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")


COMMAND = TrainingCommand(
    name="rl",
    config_class="cdlm.alignment.rl.config:ContrastivePPOConfig",
    data_class=RewardArguments,
    # PPO's budget is num_iterations and its batches are rollout_batch_size / mini_batch_size; it keeps a
    # constant learning rate.
    unused_fields=(
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "gradient_checkpointing",
        "push_to_hub",
        "hub_model_id",
    ),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rl",
        help="PPO (LoRA policy, value head, KL to reference) with optional contrastive rewards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    COMMAND.add_arguments(parser)
    parser.set_defaults(func=run)


def _read_rows(data: RewardArguments, seed: int) -> list[dict]:
    from cdlm.alignment.rl.problems import arithmetic_problems
    from cdlm.textio import MalformedRowError, read_jsonl_numbered

    if not data.prompts_file:
        return arithmetic_problems(data.num_prompts, seed=seed)
    numbered = read_jsonl_numbered(data.prompts_file, "prompts file")
    for number, row in numbered:
        if not isinstance(row.get("prompt"), (str, list)):
            found = "no 'prompt' field" if "prompt" not in row else f"a {type(row['prompt']).__name__} 'prompt'"
            raise MalformedRowError(f"{data.prompts_file}:{number} has {found}: expected text or chat messages")
    if not numbered:
        raise ValueError(f"{data.prompts_file} holds no prompts")
    return [row for _, row in numbered]


def run(args: argparse.Namespace) -> int:
    from cdlm.alignment.rl.baselines import BaselineSettings, LazyBaselines
    from cdlm.alignment.rl.rewards import ContrastiveReward, load_reward, reward_identity
    from cdlm.alignment.rl.trainer import ContrastivePPOTrainer
    from cdlm.run_identity import rows_fingerprint, weights_fingerprint

    # Everything cheap is validated before the model is loaded or anything is written.
    settings = COMMAND.resolve(args)
    config, data = settings.config, settings.data
    if not data.reward:
        raise ValueError("--reward is required: 'rule:gsm8k' or a reward-model folder")
    if settings.lora.lora_r == 0:
        raise ValueError(
            "cdlm rl trains a LoRA adapter (its reference is the adapter-disabled base): lora_r must be >= 1"
        )
    rows = _read_rows(data, config.seed)
    reward = load_reward(data.reward)
    loaded = load_from_args(args)
    resume = settings.prepare_output(args, loaded, data={"prompts": rows_fingerprint(rows)})
    if data.contrastive_k is not None:
        baseline_settings = BaselineSettings(
            k=data.contrastive_k,
            max_new_tokens=config.max_new_tokens,
            temperature=data.baseline_temperature,
            seed=config.seed,
            use_chat_template=config.use_chat_template,
            model=args.model,
            reward=reward_identity(reward),
            weights=weights_fingerprint(loaded.model),
        )
        cache_path = Path(data.baseline_cache or Path(config.output_dir) / "baselines.jsonl")
        if args.no_resume and not data.baseline_cache and cache_path.exists() and is_main_process():
            cache_path.unlink()  # starting over: the run's own baselines go with it
        progress(
            f"contrastive baselines: k={data.contrastive_k} responses per prompt, sampled when first used "
            f"-> {cache_path}"
        )
        baselines = LazyBaselines(
            loaded.tokenizer,
            reward,
            cache_path,
            baseline_settings,
            batch_size=max(config.rollout_batch_size, data.contrastive_k),
            progress=progress,
        )
        reward = ContrastiveReward(
            reward, baselines, aggregate=data.aggregate, normalize=data.normalize_rewards, clip=data.clip_rewards
        )

    def report(record: dict) -> None:
        progress(
            f"iteration {int(record['step'])}: reward {record['reward_raw']:.3f} score {record['score']:+.3f} "
            f"kl {record['kl']:.3f} entropy {record['policy/entropy']:.2f} ({record['seconds']:.0f}s)"
        )

    trainer = ContrastivePPOTrainer(
        loaded.model,
        config,
        loaded.tokenizer,
        reward,
        rows,
        peft_config=settings.lora.peft_config(),
        callbacks=[report],
    )
    history = trainer.train(resume_from_checkpoint=resume)
    final = trainer.latest_checkpoint()
    if is_main_process():
        print(
            json.dumps(
                {
                    "iterations": len(history),
                    "final_reward": history[-1]["reward_raw"] if history else None,
                    "checkpoint": str(final),
                }
            )
        )
    return 0
