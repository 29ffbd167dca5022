"""Contrastive rewards: aggregation, errors, the offline baseline cache, and where the baseline cancels."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from reference_formulas import grpo_advantages, rloo_advantages

from cdlm.alignment.rl import core
from cdlm.alignment.rl.baselines import BaselineCache, BaselineSettings, generate_baselines
from cdlm.alignment.rl.rewards import (
    ContrastiveReward,
    GSM8KReward,
    as_trl_reward_func,
    extract_final_number,
    load_reward,
)
from cdlm.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BASELINES = {"p1": [0.0, 1.0, 1.0, 4.0], "p2": [2.0, 2.0, 2.0, 2.0]}


def constant_reward(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    return reward


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [("mean", [3.0 - 1.5, 3.0 - 2.0]), ("median", [3.0 - 1.0, 1.0]), ("max", [3.0 - 4.0, 1.0])],
)
def test_contrastive_reward_subtracts_aggregated_baseline(aggregate, expected):
    reward = ContrastiveReward(constant_reward(3.0), BASELINES, aggregate=aggregate)
    assert reward(["p1", "p2"], ["a", "b"]) == pytest.approx(expected)
    assert reward.last_raw_rewards == [3.0, 3.0]


def test_contrastive_reward_normalisation_and_clipping():
    reward = ContrastiveReward(length_reward, {"p": [0.0]}, normalize=True)
    out = reward(["p"] * 3, ["a", "abc", "abcde"])  # contrastive 1, 3, 5: running std 2
    assert out == pytest.approx([0.5, 1.5, 2.5])
    clipped = ContrastiveReward(length_reward, {"p": [0.0]}, clip=2.0)
    assert clipped(["p"] * 2, ["a", "abcde"]) == [1.0, 2.0]


def test_contrastive_reward_errors():
    with pytest.raises(ValueError, match="needs a reward"):
        ContrastiveReward(None, BASELINES)
    with pytest.raises(ValueError, match="aggregate"):
        ContrastiveReward(length_reward, BASELINES, aggregate="mode")
    reward = ContrastiveReward(length_reward, BASELINES)
    with pytest.raises(ValueError, match="no baseline cache entry"):
        reward(["unknown prompt"], ["x"])
    with pytest.raises(ValueError, match="NaN"):
        ContrastiveReward(constant_reward(float("nan")), BASELINES)(["p1"], ["x"])
    with pytest.raises(ValueError, match="NaN"):
        ContrastiveReward(length_reward, {"p": [1.0, float("nan")]})(["p"], ["x"])
    with pytest.raises(ValueError, match="k must be >= 1"):
        BaselineSettings(k=0)


def test_contrastive_baseline_cancels_in_grpo_and_rloo_but_not_in_ppo():
    torch.manual_seed(0)
    groups, size = 3, 4
    rewards = torch.rand(groups * size)
    baseline = torch.tensor([0.3, -1.2, 2.5]).repeat_interleave(size)  # one constant per prompt
    # scale_rewards="batch" is left out: a batch-level std changes with per-prompt shifts.
    for scale in ("group", "none"):
        torch.testing.assert_close(
            grpo_advantages(rewards - baseline, size, scale), grpo_advantages(rewards, size, scale)
        )
    torch.testing.assert_close(rloo_advantages(rewards - baseline, size), rloo_advantages(rewards, size))

    # PPO: the critic's values do not know the baseline yet, so every token's advantage shifts by
    # -b * (gamma * lam)^(steps to the end), and whitening over the batch does not undo per-prompt shifts.
    length, gamma, lam = 5, 1.0, 0.95
    values = torch.randn(groups * size, length)
    mask = torch.ones(groups * size, length)
    kl = torch.zeros(groups * size, length)
    plain, _ = core.gae(core.per_token_rewards(rewards, kl, mask, 0.1), values, mask, gamma, lam)
    contrastive, _ = core.gae(core.per_token_rewards(rewards - baseline, kl, mask, 0.1), values, mask, gamma, lam)
    decay = (gamma * lam) ** torch.arange(length - 1, -1, -1, dtype=torch.float32)
    torch.testing.assert_close(contrastive - plain, -baseline[:, None] * decay[None, :])
    assert not torch.allclose(core.whiten(contrastive, mask), core.whiten(plain, mask), atol=1e-3)


def test_contrastive_reward_warns_with_group_trainers():
    reward = ContrastiveReward(length_reward, BASELINES)
    with pytest.warns(UserWarning, match="no effect"):
        func = as_trl_reward_func(reward)
    assert func.__name__ == "contrastive_length_reward"
    # TRL's GRPOTrainer/RLOOTrainer pass trainer_state: a direct use warns too (once per instance).
    direct = ContrastiveReward(length_reward, BASELINES)
    with pytest.warns(UserWarning, match="no effect"):
        assert direct(["p1"], ["ab"], trainer_state=object()) == [0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct(["p1"], ["ab"], trainer_state=object())
        as_trl_reward_func(GSM8KReward())  # a plain reward: no warning
        ContrastiveReward(length_reward, BASELINES)(["p1"], ["ab"])  # PPO-style call: no warning


def test_gsm8k_reward():
    assert extract_final_number("so 3 + 4 = 7. #### 1,234") == 1234.0
    assert extract_final_number("It is -12.5 degrees") == -12.5
    assert extract_final_number("no digits") is None
    reward = GSM8KReward()
    prompts = ["q1", "q2", "q3"]
    assert reward(prompts, ["29 + 14 = 43", "The answer is 5.", "seven"], answer=[43, "#### 6", "7"]) == [
        1.0,
        0.0,
        0.0,
    ]
    conversational = [[{"role": "assistant", "content": "43"}]]
    assert GSM8KReward({"What?": "Natalia ... #### 43"})([[{"role": "user", "content": "What?"}]], conversational) == [
        1.0
    ]
    with pytest.raises(ValueError, match="no reference answer"):
        reward(["q"], ["1"])
    assert isinstance(load_reward("rule:gsm8k"), GSM8KReward)
    with pytest.raises(ValueError, match="unknown rule reward"):
        load_reward("rule:nope")
    with pytest.raises(FileNotFoundError, match="reward model"):
        load_reward("/no/such/reward-model")


def test_baseline_cache_is_batched_resumable_and_checked(tmp_path):
    tokenizer, model = tiny_tokenizer(), tiny_llama(0)
    prompts = [{"prompt": f"Question {i}: how many?", "answer": i} for i in range(3)]
    settings = BaselineSettings(k=2, max_new_tokens=4, temperature=1.0, seed=3)
    path = tmp_path / "baselines.jsonl"
    with pytest.raises(ValueError, match="needs a reward"):
        generate_baselines(model, tokenizer, prompts, None, path, settings)
    cache = generate_baselines(model, tokenizer, prompts, length_reward, path, settings, batch_size=4)
    assert len(cache) == 3 and cache.settings["k"] == 2
    for row in prompts:
        responses = cache.responses(row["prompt"])
        assert len(responses) == 2 and cache[row["prompt"]] == [float(len(r)) for r in responses]
    complete = path.read_text().splitlines()
    # Interrupted run: the last prompt's line is lost (and a partial line written); resuming rebuilds it identically.
    path.write_text("\n".join(complete[:-1]) + '\n{"prompt": "Quest')
    resumed = generate_baselines(model, tokenizer, prompts, length_reward, path, settings, batch_size=4)
    assert {p: resumed.responses(p) for p in resumed} == {p: cache.responses(p) for p in cache}
    with pytest.raises(ValueError, match="different settings"):
        generate_baselines(
            model, tokenizer, prompts, length_reward, path, BaselineSettings(k=3, max_new_tokens=4, seed=3)
        )
    with pytest.raises(FileNotFoundError):
        BaselineCache(tmp_path / "missing.jsonl")
    header = json.loads(complete[0])
    assert header["settings"]["max_new_tokens"] == 4 and header["settings"]["temperature"] == 1.0
    # Used as a ContrastiveReward baseline: the mean of the cached rewards is subtracted.
    contrastive = ContrastiveReward(length_reward, cache)
    first = prompts[0]["prompt"]
    assert contrastive([first], ["abcd"]) == pytest.approx([4.0 - sum(cache[first]) / 2])


def test_contrastive_reward_runs_in_trl_grpo_and_warns(tmp_path):
    """It works as a GRPOTrainer reward function (one real training step) and warns that it has no effect there."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    prompts = ["The quick brown", "A man is"]
    reward = ContrastiveReward(length_reward, {p: [1.0, 3.0] for p in prompts})
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        report_to=[],
        bf16=False,
        logging_steps=1,
        save_strategy="no",
    )
    with pytest.warns(UserWarning, match="no effect with GRPO"):
        trainer = GRPOTrainer(
            model=str(folder),
            reward_funcs=as_trl_reward_func(reward),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
        )
    trainer.train()
    assert trainer.state.global_step == 1
    assert len(reward.last_raw_rewards) == 4  # TRL called it with every completion of the step
