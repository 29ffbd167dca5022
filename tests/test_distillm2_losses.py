"""DistiLLM-2 losses and schedules against float64 oracles, limiting cases and invariants."""

from __future__ import annotations

import pytest
import torch

from cdlm.alignment.distill.losses import (
    adaptive_alpha,
    chunked_sequence_stats,
    distillm2_objective,
    forward_kl,
    likelihood_gap,
    linear_beta,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 50


def _logits(*shape, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, V, generator=generator) * scale


def _naive_skl(t, s, a):
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    return (p * (p / (a * p + (1 - a) * q)).log()).sum(-1)


def _naive_srkl(t, s, a):
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    return (q * (q / ((1 - a) * p + a * q)).log()).sum(-1)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5, 0.9])
def test_skew_divergences_match_float64_oracle(alpha):
    t, s = _logits(4, 7, seed=1), _logits(4, 7, seed=2)
    torch.testing.assert_close(skew_kl(t, s, alpha).double(), _naive_skl(t, s, alpha), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(skew_reverse_kl(t, s, alpha).double(), _naive_srkl(t, s, alpha), atol=2e-5, rtol=1e-4)


def test_plain_kls_match_oracle_and_are_zero_on_equal_inputs():
    t, s = _logits(3, 5, seed=3), _logits(3, 5, seed=4)
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    torch.testing.assert_close(forward_kl(t, s).double(), (p * (p / q).log()).sum(-1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(reverse_kl(t, s).double(), (q * (q / p).log()).sum(-1), atol=2e-5, rtol=1e-4)
    for fn in (skew_kl, skew_reverse_kl):
        assert fn(t, t, 0.3).abs().max() < 1e-5


def test_alpha_to_zero_gives_kl_and_reverse_kl():
    t, s = _logits(2, 6, scale=1.0, seed=5), _logits(2, 6, scale=1.0, seed=6)
    # the error shrinks linearly with alpha ...
    errors = [(skew_kl(t, s, a) - forward_kl(t, s)).abs().max().item() for a in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > errors[1] > errors[2]
    torch.testing.assert_close(skew_kl(t, s, 1e-6), forward_kl(t, s), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(skew_reverse_kl(t, s, 1e-6), reverse_kl(t, s), atol=1e-4, rtol=1e-4)
    # and the skew makes both strictly smaller (the mixture is closer to each side)
    assert (skew_kl(t, s, 0.1) < forward_kl(t, s)).all()
    assert (skew_reverse_kl(t, s, 0.1) < reverse_kl(t, s)).all()


def test_log_space_mixture_is_finite_for_extreme_logits():
    t = torch.full((2, V), -1e4)
    t[:, 0] = 1e4
    s = torch.full((2, V), -1e4)
    s[:, 1] = 1e4  # disjoint point masses: p and q underflow to exactly 0 off their mode
    for fn in (skew_kl, skew_reverse_kl):
        value = fn(t, s, 0.1)
        assert torch.isfinite(value).all()
        # KL(delta_0 || 0.1 delta_0 + 0.9 delta_1) = log(1 / 0.1)
        torch.testing.assert_close(value, torch.full((2,), -torch.log(torch.tensor(0.1))), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_open_interval_is_rejected(bad):
    t = _logits(1, 2)
    with pytest.raises(ValueError, match="alpha"):
        skew_kl(t, t, bad)
    with pytest.raises(ValueError, match="alpha"):
        skew_reverse_kl(t, t, torch.tensor([bad]))


def test_gradients_reach_only_the_student_and_srkl_mixture_is_detached():
    t = _logits(3, 4, seed=7).requires_grad_(True)
    s = _logits(3, 4, seed=8).requires_grad_(True)
    alpha = 0.2
    (skew_kl(t, s, alpha).sum() + skew_reverse_kl(t, s, alpha).sum()).backward()
    assert t.grad is None or t.grad.abs().max() == 0
    assert s.grad.abs().max() > 0

    # SRKL's gradient equals the float64 oracle's with the student inside the mixture held fixed ...
    s64 = s.detach().double().requires_grad_(True)
    p = t.detach().double().softmax(-1)
    q = s64.softmax(-1)
    mix = (1 - alpha) * p + alpha * q.detach()
    (q * (q / mix).log()).sum().backward()
    s2 = s.detach().clone().requires_grad_(True)
    skew_reverse_kl(t.detach(), s2, alpha).sum().backward()
    torch.testing.assert_close(s2.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)
    # ... and differs from the gradient of the undetached divergence.
    s64b = s.detach().double().requires_grad_(True)
    qb = s64b.softmax(-1)
    (qb * (qb / ((1 - alpha) * p + alpha * qb)).log()).sum().backward()
    assert (s64b.grad - s64.grad).abs().max() > 1e-4

    # SKL's gradient equals the full autograd gradient of the oracle (nothing detached there).
    s64c = s.detach().double().requires_grad_(True)
    _naive_skl(t.detach(), s64c, alpha).sum().backward()
    s3 = s.detach().clone().requires_grad_(True)
    skew_kl(t.detach(), s3, alpha).sum().backward()
    torch.testing.assert_close(s3.grad.double(), s64c.grad, atol=1e-5, rtol=1e-4)


def test_per_sequence_alpha_broadcasts():
    t, s = _logits(3, 4, seed=9), _logits(3, 4, seed=10)
    alphas = torch.tensor([0.05, 0.1, 0.3])
    got = skew_kl(t, s, alphas[:, None])
    for row, a in enumerate(alphas.tolist()):
        torch.testing.assert_close(got[row], skew_kl(t[row], s[row], a))


def test_distillm2_objective_mixes_the_two_sides():
    skl, srkl = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    torch.testing.assert_close(distillm2_objective(skl, srkl, 0.25), 0.75 * skl + 0.25 * srkl)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="beta"):
            distillm2_objective(skl, srkl, bad)


# ---------------------------------------------------------------------------- schedules


def test_linear_beta_increases_and_clips():
    values = [linear_beta(step, 100, 0.5, 0.8) for step in (0, 25, 50, 62, 100, 200)]
    assert values[0] == 0.5
    assert values[1] == pytest.approx(0.7)
    assert values[2] == pytest.approx(0.9)
    assert values[3] == pytest.approx(0.996)
    assert values[4] == 1.0 and values[5] == 1.0
    assert values == sorted(values)
    # official "gradual beta": 0.5 -> 0.75 reached halfway, then flat
    assert linear_beta(50, 100, 0.5, 0.5, beta_max=0.75) == pytest.approx(0.75)
    assert linear_beta(90, 100, 0.5, 0.5, beta_max=0.75) == pytest.approx(0.75)
    # a negative increase never goes below beta0
    assert linear_beta(50, 100, 0.5, -1.0) == 0.5
    with pytest.raises(ValueError, match="beta0"):
        linear_beta(0, 10, 1.2, 0.1)
    with pytest.raises(ValueError, match="beta_max"):
        linear_beta(0, 10, 0.5, 0.1, beta_max=0.4)


def test_adaptive_alpha_follows_algorithm_1():
    alpha0 = 0.1
    anchor = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    gap = torch.tensor([0.2, 0.19, 0.3, 0.05, -0.1])
    alpha = adaptive_alpha(gap, anchor, alpha0, alpha_min=0.01)
    assert alpha[0] == pytest.approx(alpha0)  # the initial gap gives alpha0
    # inside the clip range the skewed gap (1 - alpha) d equals the anchor (1 - alpha0) d0
    assert (1 - alpha[1]) * gap[1] == pytest.approx((1 - alpha0) * anchor[1])
    assert alpha[1] < alpha0
    assert alpha[2] == pytest.approx(alpha0)  # a wider gap than the anchor: clipped to alpha0
    assert alpha[3] == pytest.approx(0.01)  # a much smaller gap: clipped to alpha_min
    assert alpha[4] == pytest.approx(alpha0)  # student already ahead: keep alpha0
    # monotone: as the student closes the gap, alpha decreases
    gaps = torch.linspace(0.2, 0.15, 6)
    alphas = adaptive_alpha(gaps, torch.full_like(gaps, 0.2), alpha0)
    assert (alphas[1:] <= alphas[:-1]).all()
    with pytest.raises(ValueError):
        adaptive_alpha(gap, anchor, alpha0=0.1, alpha_min=0.2)


def test_likelihood_gap_uses_geometric_mean_probabilities():
    gap = likelihood_gap(torch.tensor([-0.5]), torch.tensor([-2.0]))
    assert gap.item() == pytest.approx(torch.tensor(-0.5).exp().item() - torch.tensor(-2.0).exp().item())


# ---------------------------------------------------------------------------- chunking


def _chunk_setup(seed=0):
    torch.manual_seed(seed)
    hidden_s, hidden_t = 8, 12
    head_s = torch.nn.Linear(hidden_s, V, bias=False)
    head_t = torch.nn.Linear(hidden_t, V, bias=False)
    n = 23
    s_h = torch.randn(n, hidden_s, requires_grad=True)
    t_h = torch.randn(n, hidden_t)
    labels = torch.randint(0, V, (n,))
    seq_index = torch.sort(torch.randint(0, 4, (n,))).values
    return head_s, head_t, s_h, t_h, labels, seq_index


@pytest.mark.parametrize("divergence", ["skl", "srkl", "fkl", "rkl"])
def test_chunking_gives_the_same_values_and_gradients(divergence):
    head_s, head_t, s_h, t_h, labels, seq_index = _chunk_setup()
    alpha = torch.tensor([0.1, 0.05, 0.2, 0.3])
    results = []
    for chunk, recompute in ((1000, False), (5, False), (3, True), (1, True)):
        s = s_h.detach().clone().requires_grad_(True)
        head_s.zero_grad()
        stats = chunked_sequence_stats(
            student_hidden=s,
            teacher_hidden=t_h,
            labels=labels,
            seq_index=seq_index,
            num_sequences=4,
            student_logits_fn=head_s,
            teacher_logits_fn=head_t,
            divergence=divergence,
            alpha=alpha,
            chunk_size=chunk,
            recompute=recompute,
        )
        (stats["divergence"] / stats["count"].clamp_min(1)).sum().backward()
        results.append((stats, s.grad.clone(), head_s.weight.grad.clone()))
    reference = results[0]
    for stats, grad, head_grad in results[1:]:
        for key in reference[0]:
            torch.testing.assert_close(stats[key], reference[0][key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, reference[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(head_grad, reference[2], atol=1e-6, rtol=1e-5)
    # against the direct per-token computation
    from cdlm.alignment.distill.losses import token_divergence

    with torch.no_grad():
        s_logits, t_logits = head_s(s_h), head_t(t_h)
        per_token = token_divergence(divergence, t_logits, s_logits, alpha[seq_index])
        expected = torch.zeros(4).index_add(0, seq_index, per_token)
        s_lp = torch.log_softmax(s_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(reference[0]["divergence"].detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        reference[0]["student_logp"].detach(), torch.zeros(4).index_add(0, seq_index, s_lp), atol=1e-5, rtol=1e-5
    )
    assert reference[0]["count"].sum().item() == labels.numel()
