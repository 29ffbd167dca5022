"""A LoRA reward model trained with TRL's RewardTrainer, loaded back and used as a (contrastive) reward."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset

from cdlm import testing
from cdlm.alignment.rl.reward_model import train_reward_model
from cdlm.alignment.rl.rewards import ContrastiveReward, SequenceClassificationReward, load_reward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_reward_model_with_trl_and_score(tmp_path):
    base = tmp_path / "base"
    testing.tiny_llama(seed=0).save_pretrained(base)
    tokenizer = testing.tiny_tokenizer()
    tokenizer.save_pretrained(base)
    pairs = Dataset.from_list(
        [{"prompt": f"Question {i}:", "chosen": " the answer is 4", "rejected": " no idea"} for i in range(8)]
    )
    with pytest.raises(ValueError, match="missing column"):
        train_reward_model(base, tokenizer, Dataset.from_list([{"chosen": "a"}]), tmp_path / "bad")
    trainer = train_reward_model(
        base,
        tokenizer,
        pairs,
        tmp_path / "rm",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_length=64,
        lora_r=4,
    )
    assert trainer.state.global_step == 3
    reward = load_reward(str(tmp_path / "rm"))
    assert isinstance(reward, SequenceClassificationReward)
    scores = reward(["Question 0:", "Question 0:"], [" the answer is 4", " no idea"])
    assert all(math.isfinite(s) for s in scores)
    assert scores[0] > scores[1]  # it learned the preference it was trained on
    contrastive = ContrastiveReward(reward, {"Question 0:": [scores[1], scores[1]]})
    assert contrastive(["Question 0:"], [" the answer is 4"]) == pytest.approx([scores[0] - scores[1]], abs=1e-4)
