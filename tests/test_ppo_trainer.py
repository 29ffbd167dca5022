"""ContrastivePPOTrainer on a tiny Llama: log-probs under left padding, reference = adapter off, updates, resume."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from cdlm.alignment.rl.rewards import ContrastiveReward
from cdlm.alignment.rl.rollout import render_prompts, response_mask, sample_responses
from cdlm.alignment.rl.trainer import ContrastivePPOConfig, ContrastivePPOTrainer
from cdlm.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = ["The quick brown", "Answer: She sold", "A man is sitting on", "Human: How do I bake"]


def letter_reward(prompts, completions, **kwargs):
    """Rewards responses that use the letter 'e' (something a tiny random model can learn to do)."""
    return [c.count("e") / 4.0 for c in completions]


def make_trainer(tmp_path, reward=letter_reward, **overrides) -> ContrastivePPOTrainer:
    settings = dict(
        output_dir=str(tmp_path / "ppo"),
        num_iterations=2,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        max_new_tokens=4,
        learning_rate=3e-3,
        temperature=1.0,
        kl_coef=0.1,
        seed=0,
    )
    settings.update(overrides)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    return ContrastivePPOTrainer(
        tiny_llama(0), ContrastivePPOConfig(**settings), tiny_tokenizer(), reward, PROMPTS, peft_config=lora
    )


def test_response_mask_keeps_first_eos_only():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert response_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_forward_logprobs_match_unpadded_forward(tmp_path):
    trainer = make_trainer(tmp_path)
    tokenizer = trainer.tokenizer
    torch.manual_seed(0)
    rollout = sample_responses(
        trainer.model,
        tokenizer,
        render_prompts(tokenizer, ["Hi", "A much longer prompt here"], True),
        max_new_tokens=4,
    )
    with torch.no_grad():
        logprobs, entropy, values = trainer._forward(trainer.model, rollout, slice(None), with_values=True)
        for row in range(2):
            length = int(rollout.response_mask[row].sum())
            prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
            sequence = torch.cat([prompt, rollout.response_ids[row, :length]])[None]
            logits = trainer.model(input_ids=sequence).logits[0, len(prompt) - 1 : -1] / trainer.args.temperature
            expected = torch.log_softmax(logits, -1).gather(-1, sequence[0, len(prompt) :, None]).squeeze(-1)
            torch.testing.assert_close(logprobs[row, :length], expected, atol=1e-4, rtol=1e-4)
    assert values.shape == logprobs.shape == entropy.shape
    assert (entropy >= 0).all()


def test_ppo_steps_change_policy_and_log_finite_statistics(tmp_path):
    trainer = make_trainer(tmp_path)
    before = trainer._trainable_state()
    history = trainer.train()
    after = trainer._trainable_state()
    assert len(history) == 2
    lora_b = [name for name in before if "lora_B" in name]
    assert lora_b and any(not torch.equal(before[n], after[n]) for n in lora_b)
    assert not torch.equal(before["value_head.summary.weight"], after["value_head.summary.weight"])
    # Before any update the LoRA B matrices are zero: policy == reference, so the KL is exactly 0.
    assert history[0]["kl"] == 0.0
    for record in history:
        assert all(math.isfinite(v) for v in record.values())
        assert record["policy/entropy"] > 0
    assert history[1]["kl"] != 0.0
    # The reference really is the base model: disabling the adapter gives the original weights' logits.
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad(), trainer.model.disable_adapter():
        reference_logits = trainer.model(input_ids=ids).logits
    torch.testing.assert_close(reference_logits, tiny_llama(0)(input_ids=ids).logits)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "a", num_iterations=2)
    full.train()
    first = make_trainer(tmp_path / "b", num_iterations=1)
    first.train()
    resumed = make_trainer(tmp_path / "b", num_iterations=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 2 and len(resumed.history) == 2
    expected, got = full._trainable_state(), resumed._trainable_state()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert (tmp_path / "b" / "ppo" / "checkpoint-2" / "adapter" / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path / "c").train(resume_from_checkpoint=True)


def test_contrastive_reward_in_ppo_logs_raw_and_contrastive_scores(tmp_path):
    baselines = {p: [0.25, 0.75] for p in PROMPTS}
    trainer = make_trainer(tmp_path, reward=ContrastiveReward(letter_reward, baselines), num_iterations=1)
    record = trainer.train()[0]
    assert record["score"] == pytest.approx(record["reward_raw"] - 0.5)


def test_config_and_input_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        ContrastivePPOConfig(rollout_batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError, match="kl_estimator"):
        ContrastivePPOConfig(kl_estimator="k9")
    with pytest.raises(ValueError, match="reward function"):
        ContrastivePPOTrainer(tiny_llama(0), ContrastivePPOConfig(), tiny_tokenizer(), None, PROMPTS)
    with pytest.raises(ValueError, match="at least one prompt"):
        ContrastivePPOTrainer(tiny_llama(0), ContrastivePPOConfig(), tiny_tokenizer(), letter_reward, [])
    trainer = make_trainer(tmp_path, reward=lambda prompts, completions, **kw: [float("nan")] * len(completions))
    with pytest.raises(ValueError, match="NaN"):
        trainer.rollout_step()


def test_row_seeded_sampling_does_not_depend_on_the_batch():
    """Data-parallel rollouts rest on this: a row's response is a function of its prompt and seed alone."""
    model, tokenizer = tiny_llama(0), tiny_tokenizer()
    prompts = render_prompts(tokenizer, PROMPTS, True)
    seeds = [11, 12, 13, 14]
    whole = sample_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, row_seeds=seeds)
    half = sample_responses(model, tokenizer, prompts[2:], max_new_tokens=6, temperature=1.0, row_seeds=seeds[2:])
    assert whole.texts[2:] == half.texts
    other = sample_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, row_seeds=[21, 22, 23, 24])
    assert other.texts != whole.texts  # the seeds matter (sampling, not greedy)


def test_row_seeded_sampling_draws_from_the_warped_distribution():
    """Gumbel-max over temperature/top-k-warped logits: empirical frequencies match softmax(top-k(z / T))."""
    from cdlm.alignment.rl.rollout import RowSeededSampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    counts = torch.zeros(5)
    for seed in range(4000):
        counts[RowSeededSampling([seed], temperature=0.5, top_k=3)(None, logits).argmax()] += 1
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.5, -1)
    assert counts[3:].sum() == 0
    torch.testing.assert_close(counts[:3] / counts.sum(), expected, atol=0.02, rtol=0)


def test_ppo_config_is_training_arguments_with_help():
    from dataclasses import fields

    from transformers import HfArgumentParser, TrainingArguments

    own = [f for f in fields(ContrastivePPOConfig) if f.name not in {g.name for g in fields(TrainingArguments)}]
    assert own and all(f.metadata.get("help") for f in own), [f.name for f in own if not f.metadata.get("help")]
    (config,) = HfArgumentParser(ContrastivePPOConfig).parse_args_into_dataclasses(
        ["--num_iterations", "3", "--gradient_accumulation_steps", "2", "--kl_estimator", "k3", "--report_to", "none"]
    )
    assert (config.num_iterations, config.gradient_accumulation_steps, config.kl_estimator) == (3, 2, "k3")
    assert (config.learning_rate, config.seed, config.save_steps, config.logging_steps) == (5e-5, 0, 0, 1)
    with pytest.raises(ValueError, match="multiple of processes x"):
        ContrastivePPOConfig(mini_batch_size=4, gradient_accumulation_steps=3).check_processes(1)
    with pytest.raises(ValueError, match="number of processes"):
        ContrastivePPOConfig(rollout_batch_size=8, mini_batch_size=4).check_processes(3)
