"""``ContrastivePPOConfig``: the training arguments of :class:`~cdlm.alignment.rl.trainer.ContrastivePPOTrainer`.

A ``transformers.TrainingArguments`` subclass, like TRL's configs, so the ``TrainingArguments`` fields
mean what they mean everywhere else (``output_dir``, ``learning_rate``, ``max_grad_norm``, ``seed``,
``bf16``, ``gradient_accumulation_steps``, ``logging_steps``, ``report_to``, ``save_steps``,
``save_total_limit``, ``resume_from_checkpoint``) and ``HfArgumentParser`` builds ``cdlm rl`` from it.
PPO's own fields follow the old TRL ``ContrastivePPOConfig`` names where one existed.

Batch sizes are *global* (summed over processes), so a run gives the same result on any number of
processes: ``rollout_batch_size`` prompts are sampled per iteration (each process samples its
``rollout_batch_size / num_processes`` share) and every optimizer step uses ``mini_batch_size``
responses, split over processes and then into ``gradient_accumulation_steps`` micro-batches.
``per_device_train_batch_size`` and the epoch/step counters of ``TrainingArguments`` are not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from cdlm.alignment.parallel import use_cpu_for_cpu_launch
from cdlm.alignment.rl.core import KL_ESTIMATORS
from cdlm.alignment.settings import check_values


@dataclass
class ContrastivePPOConfig(TrainingArguments):
    """Hyperparameters of :class:`~cdlm.alignment.rl.trainer.ContrastivePPOTrainer` (``TrainingArguments`` apply).

    Named apart from TRL's own PPO classes so that both can be imported side by side.
    """

    output_dir: str | None = field(
        default="ppo-output", metadata={"help": "Folder for checkpoints and the final adapter."}
    )
    num_iterations: int = field(default=10, metadata={"help": "PPO iterations (one rollout + its updates each)."})
    rollout_batch_size: int = field(
        default=8, metadata={"help": "Prompts (= responses) sampled per iteration, over all processes together."}
    )
    mini_batch_size: int = field(
        default=4, metadata={"help": "Responses per optimizer step, over all processes and accumulation steps."}
    )
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each rollout batch."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate (LoRA and value head)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "Per-token KL estimator.", "choices": list(KL_ESTIMATORS)}
    )
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses that end without EOS."}
    )
    detach_value_head: bool = field(
        default=False, metadata={"help": "Train the critic as a probe on frozen policy features."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Longest sampled response, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Top-k filter of the rollouts (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus filter of the rollouts (1: off)."})
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap each prompt as a user turn of the tokenizer's chat template."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling and data order (per iteration and row)."})
    save_steps: float = field(
        default=0, metadata={"help": "Save a checkpoint every N iterations (0: only the final one, always written)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Report statistics every N iterations."})

    def __post_init__(self) -> None:
        check_values(self)
        for name in ("num_iterations", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"mini_batch_size ({self.mini_batch_size})"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for PPO sampling, got {self.temperature}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.whiten_advantages and self.rollout_batch_size < 2:
            raise ValueError("whitened advantages need rollout_batch_size >= 2")
        if self.save_steps < 0 or self.save_steps != int(self.save_steps):
            raise ValueError(f"save_steps must be a whole number of iterations >= 0, got {self.save_steps}")
        use_cpu_for_cpu_launch(self)
        super().__post_init__()
        self.save_steps = int(self.save_steps)

    def check_processes(self, num_processes: int) -> None:
        """Refuse batch sizes that cannot be split evenly over ``num_processes`` and the accumulation steps."""
        if self.rollout_batch_size % num_processes:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of the number of processes "
                f"({num_processes})"
            )
        per_step = num_processes * self.gradient_accumulation_steps
        if self.mini_batch_size % per_step:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of processes x "
                "gradient_accumulation_steps "
                f"({num_processes} x {self.gradient_accumulation_steps})"
            )
