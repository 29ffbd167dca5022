"""One contrastive PPO iteration on SmolLM2-135M-Instruct (real model, rule reward)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from cdlm.alignment.rl.baselines import BaselineSettings, generate_baselines
from cdlm.alignment.rl.problems import arithmetic_problems
from cdlm.alignment.rl.rewards import ContrastiveReward, GSM8KReward
from cdlm.alignment.rl.trainer import ContrastivePPOConfig, ContrastivePPOTrainer
from cdlm.models.registry import get_registered

pytestmark = pytest.mark.real_model


@pytest.fixture()
def fresh_smollm2():
    """A private copy: PEFT injects LoRA layers into the model, so the session fixture must not be used."""
    registered = get_registered("smollm2-135m-instruct")
    if registered is None or not registered.is_installed():
        pytest.skip("smollm2-135m-instruct: install the `models` extra to run real-model tests")
    from cdlm.models import load_model

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    torch.set_num_threads(previous)


def test_contrastive_ppo_iteration_on_smollm2(fresh_smollm2, tmp_path):
    model, tokenizer = fresh_smollm2
    rows = arithmetic_problems(2, seed=0)
    reward = GSM8KReward()
    cache = generate_baselines(
        model,
        tokenizer,
        rows,
        reward,
        tmp_path / "b.jsonl",
        BaselineSettings(k=2, max_new_tokens=8, temperature=0.7),
        batch_size=4,
    )
    assert len(cache) == 2
    config = ContrastivePPOConfig(
        output_dir=str(tmp_path / "ppo"),
        num_iterations=1,
        rollout_batch_size=2,
        mini_batch_size=1,
        ppo_epochs=1,
        max_new_tokens=8,
        learning_rate=1e-4,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = ContrastivePPOTrainer(model, config, tokenizer, ContrastiveReward(reward, cache), rows, peft_config=lora)
    record = trainer.train()[0]
    assert all(math.isfinite(v) for v in record.values())
    assert record["kl"] == 0.0  # first rollout: LoRA B = 0, policy == reference
    assert record["policy/entropy"] > 0
