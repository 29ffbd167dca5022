"""PPO maths against hand-computed examples and direct formulas (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.alignment.rl import core


def test_gae_matches_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = core.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: delta = (0.04, 0.03, 0.3); A2 = 0.3, A1 = 0.03 + 0.72 * 0.3, A0 = 0.04 + 0.72 * A1.
    # Row 1 ends after two tokens (V=0 beyond): delta = (0.16, 0.6); the masked reward 5 and value 9 are ignored.
    expected = torch.tensor([[0.21712, 0.246, 0.3], [0.592, 0.6, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values * mask)


def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    advantages, returns = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, reward_to_go - values)
    torch.testing.assert_close(returns, reward_to_go)


def test_gae_with_lambda_zero_is_one_step_td():
    rewards, values = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, -1.0, 2.0]])
    advantages, _ = core.gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 + 0.5 * -1.0 - 0.5, 2.0 + 0.5 * 2.0 + 1.0, 3.0 - 2.0]]))


def _direct_policy_loss(logprobs, old_logprobs, advantages, mask, eps):
    total, count = 0.0, 0
    for lp, old, adv, m in zip(
        logprobs.flatten().tolist(),
        old_logprobs.flatten().tolist(),
        advantages.flatten().tolist(),
        mask.flatten().tolist(),
    ):
        if m:
            ratio = math.exp(lp - old)
            total += -min(ratio * adv, min(max(ratio, 1 - eps), 1 + eps) * adv)
            count += 1
    return total / count


def test_clipped_policy_loss_matches_direct_formula():
    torch.manual_seed(1)
    logprobs, old = -torch.rand(4, 6) * 3, -torch.rand(4, 6) * 3
    advantages = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    loss, stats = core.clipped_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(_direct_policy_loss(logprobs, old, advantages, mask, 0.2), rel=1e-5)
    assert 0.0 <= stats["clipfrac"].item() <= 1.0


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected_loss", "expected_grad"),
    [
        (1.5, 1.0, -1.2, 0.0),  # good action pushed too far: clipped, no gradient
        (0.5, 1.0, -0.5, -0.5),  # good action made less likely: unclipped, pushes back up
        (0.5, -1.0, 0.8, 0.0),  # bad action already much less likely: clipped
        (1.5, -1.0, 1.5, 1.5),  # bad action made more likely: unclipped, pessimistic branch
    ],
)
def test_clipped_policy_loss_cases(ratio, advantage, expected_loss, expected_grad):
    logprob = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = core.clipped_policy_loss(logprob, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss)
    # d(loss)/d(logprob) = -A * ratio on the unclipped branch, 0 on the clipped one.
    assert logprob.grad.item() == pytest.approx(expected_grad, abs=1e-6)


def test_value_loss_clipping():
    old = torch.zeros(1, 2)
    values = torch.full((1, 2), 0.5, requires_grad=True)
    returns = torch.tensor([[1.0, -1.0]])
    loss, stats = core.clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    loss.backward()
    # Token 0: unclipped (0.5-1)^2 = 0.25 < clipped (0.2-1)^2 = 0.64 -> the clipped term wins, no gradient.
    # Token 1: unclipped (0.5+1)^2 = 2.25 > clipped (0.2+1)^2 = 1.44 -> unclipped, gradient (v - R) / 2 tokens.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25) / 2)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1.5 / 2]]))
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_value_loss_without_movement_is_plain_mse():
    values, returns = torch.tensor([[0.1, 0.3]]), torch.tensor([[1.0, 0.0]])
    loss, _ = core.clipped_value_loss(values, values.clone(), returns, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.9**2) + 0.3**2) / 2)


def test_kl_penalty_sign_and_magnitude():
    logprobs, ref = torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.5]]))
    kl = core.kl_penalty(logprobs, ref, "k1")
    torch.testing.assert_close(kl, torch.tensor([[math.log(2), -math.log(2)]]))
    k3 = core.kl_penalty(logprobs, ref, "k3")
    torch.testing.assert_close(k3, torch.tensor([[0.5 - 1 + math.log(2), 2 - 1 - math.log(2)]]))
    assert (k3 >= 0).all()
    # Shaped rewards: minus kl_coef * KL per token (policy more confident than the reference is penalised),
    # the score on the last real token only.
    mask = torch.tensor([[1, 1, 0]])
    kl3 = torch.tensor([[math.log(2), -math.log(2), 7.0]])
    shaped = core.per_token_rewards(torch.tensor([2.0]), kl3 * mask, mask, kl_coef=0.1)
    torch.testing.assert_close(shaped, torch.tensor([[-0.1 * math.log(2), 0.1 * math.log(2) + 2.0, 0.0]]))


def test_kl_estimators_are_unbiased_for_the_true_kl():
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(50), 0)
    q = torch.softmax(torch.randn(50), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    for estimator in ("k1", "k3"):
        # Expectation over tokens sampled from the policy p, computed exactly.
        expectation = (p * core.kl_penalty(p.log(), q.log(), estimator)).sum()
        assert expectation.item() == pytest.approx(true_kl.item(), rel=1e-4)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        core.kl_penalty(p, q, "k2")


def test_whiten_and_masked_statistics():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    whitened = core.whiten(values, mask)
    assert core.masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert core.masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-5)
    assert whitened[0, 3] == 0
    scaled = core.whiten(values, mask, shift_mean=False)
    assert core.masked_mean(scaled, mask).item() == pytest.approx(2.0, rel=1e-5)


def test_entropy_from_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert core.entropy_from_logits(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert core.last_token_index(mask).tolist() == [1, 3, 0]
