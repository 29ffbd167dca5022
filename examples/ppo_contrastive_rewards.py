"""PPO with contrastive rewards (Shen et al., 2024) on SmolLM2-135M-Instruct with a verifiable reward.

1. Offline: sample k responses per training prompt from the initial policy and score them (cached).
2. PPO (LoRA policy + value head, KL to the adapter-disabled base) on r(x, y) - mean_i r(x, y_i).

    HF_HUB_OFFLINE=1 python examples/ppo_contrastive_rewards.py   # -> runs/examples/ppo

Prints one line per iteration (raw reward, contrastive score, KL) and the held-out accuracy on 8 problems. Three
iterations of 4 prompts are a demonstration of the loop, not a gain: rewards are 0/1 and 8 held-out problems
move in steps of 0.125. The longer runs in `benchmarks/results/README.md` ("Distillation and PPO") found the
difference between plain and contrastive rewards to be noise at this scale.

Swap ``GSM8KReward()`` for ``load_reward("path/to/reward-model")`` (e.g. one trained with
``cdlm.alignment.train_reward_model`` from preference pairs) to use a learned reward instead.
"""

from __future__ import annotations

import torch
from peft import LoraConfig

from cdlm.alignment import (
    BaselineSettings,
    ContrastivePPOConfig,
    ContrastivePPOTrainer,
    ContrastiveReward,
    GSM8KReward,
    generate_baselines,
)
from cdlm.alignment.rl.problems import arithmetic_problems
from cdlm.models import load_model

torch.set_num_threads(1)  # small models on a shared CPU: one thread avoids barrier stalls
model, tokenizer = load_model("smollm2-135m-instruct")
train = arithmetic_problems(8, seed=0)  # {"prompt": "What is 17 + 25? Answer with just the number.", "answer": 42}
reward = GSM8KReward()  # 1.0 when the final number in the response equals "answer"

cache = generate_baselines(
    model,
    tokenizer,
    train,
    reward,
    "runs/examples/ppo/baselines.jsonl",
    BaselineSettings(k=4, max_new_tokens=16, temperature=0.7, model="smollm2-135m-instruct"),
    batch_size=16,
)
contrastive = ContrastiveReward(reward, cache, aggregate="mean")

config = ContrastivePPOConfig(
    output_dir="runs/examples/ppo",
    num_iterations=3,
    rollout_batch_size=4,
    mini_batch_size=2,
    max_new_tokens=16,
    learning_rate=2e-4,
    kl_coef=0.05,
)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
trainer = ContrastivePPOTrainer(model, config, tokenizer, contrastive, train, peft_config=lora)
for record in trainer.train():
    print(
        f"iteration {int(record['step'])}: reward {record['reward_raw']:.2f}, "
        f"contrastive {record['score']:+.2f}, KL {record['kl']:.3f}"
    )
print("held-out accuracy:", sum(trainer.evaluate(arithmetic_problems(8, seed=1), reward=reward)) / 8)
