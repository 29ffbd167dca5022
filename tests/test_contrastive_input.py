"""Contrastive input decoding against a naive full-recomputation reference, plus its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList

from cdlm import testing
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.decoding.methods import ContrastiveInputMethod, get_method
from cdlm.decoding.runner import generate as run_generate

PAIRS = [
    ("The quick brown fox jumps", "The lazy dog"),
    ("Question: Natalia sold clips to 48 of her friends in April.", "Question: she sold clips."),
    ("Human: How do I bake bread?", "Human: How do I bake a cake? Assistant: Mix flour"),
]
PROMPTS = [p for p, _ in PAIRS]
CONTRASTIVE = [c for _, c in PAIRS]
EOS = testing.EOS_ID


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def naive_cid_greedy(model, prompt_ids, contrastive_ids, steps, *, lam, alpha):
    """Recompute p(.|x, y) and p(.|x', y) from scratch each step, one pair at a time, no padding."""
    generated: list[int] = []
    for _ in range(steps):
        p_x = torch.softmax(_last_logits(model, prompt_ids + generated), -1)
        p_c = torch.softmax(_last_logits(model, contrastive_ids + generated), -1)
        scores = torch.log(p_x) - lam * torch.log(p_c)
        scores[p_x < alpha * p_x.max()] = -math.inf
        token = int(scores.argmax())
        generated.append(token)
        if token == EOS:
            break
    return generated


def _cut(tokens):
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _encode(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


def _run(model, batch, contrastive, steps=10, **kwargs):
    lam = kwargs.pop("cid_lambda", 1.0)
    alpha = kwargs.pop("alpha", 0.1)
    processor = ContrastiveInputLogitsProcessor(
        model, contrastive["input_ids"], contrastive["attention_mask"], cid_lambda=lam, alpha=alpha
    )
    kwargs.setdefault("do_sample", False)
    out = model.generate(**batch, max_new_tokens=steps, logits_processor=LogitsProcessorList([processor]), **kwargs)
    return out, processor


def _generated(out, batch):
    return [_cut(row) for row in out[:, batch["input_ids"].shape[1] :].tolist()]


@pytest.mark.parametrize("lam, alpha", [(1.0, 0.1), (0.5, 0.05), (2.0, 0.3)])
def test_batched_processor_matches_naive_reference(tiny_llama, tiny_tokenizer, lam, alpha):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)
    assert (batch["attention_mask"] == 0).any() and (contrastive["attention_mask"] == 0).any()
    out, processor = _run(tiny_llama, batch, contrastive, cid_lambda=lam, alpha=alpha)
    for (prompt, other), tokens in zip(PAIRS, _generated(out, batch)):
        reference = naive_cid_greedy(
            tiny_llama,
            tiny_tokenizer(prompt)["input_ids"],
            tiny_tokenizer(other)["input_ids"],
            10,
            lam=lam,
            alpha=alpha,
        )
        assert tokens == reference
    assert processor.branch.recomputations == 0


def test_gemma3_matches_naive_reference(tiny_tokenizer):
    model = testing.tiny_gemma3(seed=0)
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS[:2]), _encode(tiny_tokenizer, CONTRASTIVE[:2])
    out, _ = _run(model, batch, contrastive, steps=10)
    for (prompt, other), tokens in zip(PAIRS, _generated(out, batch)):
        ids, other_ids = tiny_tokenizer(prompt)["input_ids"], tiny_tokenizer(other)["input_ids"]
        assert tokens == naive_cid_greedy(model, ids, other_ids, 10, lam=1.0, alpha=0.1)


def test_batched_equals_each_pair_alone(tiny_llama, tiny_tokenizer):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)
    together = _generated(_run(tiny_llama, batch, contrastive)[0], batch)
    for (prompt, other), tokens in zip(PAIRS, together):
        single, single_c = _encode(tiny_tokenizer, [prompt]), _encode(tiny_tokenizer, [other])
        assert _generated(_run(tiny_llama, single, single_c)[0], single)[0] == tokens


def test_lambda_zero_is_plain_greedy(tiny_llama, tiny_tokenizer):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)
    greedy = tiny_llama.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(_run(tiny_llama, batch, contrastive, cid_lambda=0.0)[0], greedy)


def test_contrastive_input_equal_to_input_with_small_lambda_is_greedy(tiny_llama, tiny_tokenizer):
    """x' = x: the score is (1 - lambda) log p on the plausible set, so lambda < 1 keeps greedy's argmax."""
    batch = _encode(tiny_tokenizer, PROMPTS)
    greedy = tiny_llama.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(_run(tiny_llama, batch, batch, cid_lambda=0.5)[0], greedy)


def test_every_step_scores_equal_the_papers_formula(tiny_llama, tiny_tokenizer):
    """Each step's scores, row by row, against log p(.|x, y) - lambda log p(.|x', y) on the unpadded
    inputs (exact values, -inf outside V_head); the outputs differ from greedy, so it is not vacuous."""
    lam, alpha, steps = 2.0, 0.01, 6
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)
    out, _ = _run(
        tiny_llama,
        batch,
        contrastive,
        steps=steps,
        cid_lambda=lam,
        alpha=alpha,
        output_scores=True,
        return_dict_in_generate=True,
    )
    prompt_len = batch["input_ids"].shape[1]
    for row, (prompt, other) in enumerate(PAIRS):
        x, x_c = tiny_tokenizer(prompt)["input_ids"], tiny_tokenizer(other)["input_ids"]
        generated = out.sequences[row, prompt_len:].tolist()
        for step, scores in enumerate(out.scores):
            p_x = torch.softmax(_last_logits(tiny_llama, x + generated[:step]), -1)
            p_c = torch.softmax(_last_logits(tiny_llama, x_c + generated[:step]), -1)
            expected = torch.log(p_x) - lam * torch.log(p_c)
            expected[p_x < alpha * p_x.max()] = -math.inf
            assert torch.equal(torch.isinf(scores[row]), torch.isinf(expected))
            finite = torch.isfinite(expected)
            torch.testing.assert_close(scores[row][finite], expected[finite], atol=1e-4, rtol=1e-4)
    greedy = tiny_llama.generate(**batch, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(out.sequences, greedy)


def naive_cid_beam(model, prompt_ids, contrastive_ids, steps, beams, *, lam, alpha, banned=(EOS,)):
    """Plain beam search on summed CID scores, recomputing both branches from scratch for every beam.

    Under beam search generate() hands processors log-probs (the banned ids already at -inf), and the
    per-token score is log p(v | x, y) - lambda log p(v | x', y) on V_head, -inf elsewhere.
    """
    running = [(0.0, [])]
    for _ in range(steps):
        candidates = []
        for score, generated in running:
            step = torch.log_softmax(_last_logits(model, prompt_ids + generated), -1)
            step[list(banned)] = -math.inf
            lp_x = torch.log_softmax(step, -1)
            lp_c = torch.log_softmax(_last_logits(model, contrastive_ids + generated), -1)
            contrast = torch.where(lp_x.exp() >= alpha * lp_x.exp().max(), lp_x - lam * lp_c, torch.tensor(-math.inf))
            values, tokens = contrast.topk(beams)
            candidates += [
                (score + float(v), generated + [int(t)]) for v, t in zip(values, tokens) if math.isfinite(v)
            ]
        candidates.sort(key=lambda c: c[0], reverse=True)
        running = candidates[:beams]
    return running[0][1]


@pytest.mark.parametrize("lam, alpha", [(1.0, 0.05), (0.5, 0.1)])
def test_beam_search_matches_naive_beam_reference(tiny_llama, tiny_tokenizer, lam, alpha):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)
    out, processor = _run(
        tiny_llama, batch, contrastive, steps=8, num_beams=3, cid_lambda=lam, alpha=alpha, suppress_tokens=[EOS]
    )
    assert processor.branch.reorders > 0 and processor.branch.recomputations == 0
    for (prompt, other), tokens in zip(PAIRS, _generated(out, batch)):
        x, x_c = tiny_tokenizer(prompt)["input_ids"], tiny_tokenizer(other)["input_ids"]
        assert tokens == naive_cid_beam(tiny_llama, x, x_c, 8, 3, lam=lam, alpha=alpha)
    plain = tiny_llama.generate(**batch, max_new_tokens=8, num_beams=3, suppress_tokens=[EOS])
    assert not torch.equal(out, plain)  # the contrast decides beams here: the reference check is not vacuous


def test_beam_search_follows_reordered_beams_and_is_reproducible(tiny_llama, tiny_tokenizer):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)
    first, processor = _run(tiny_llama, batch, contrastive, steps=8, num_beams=3, alpha=0.05)
    second, _ = _run(tiny_llama, batch, contrastive, steps=8, num_beams=3, alpha=0.05)
    assert processor.branch.reorders > 0 and processor.branch.recomputations == 0
    assert torch.equal(first, second)
    # Each row alone gives the same beams: rows of other pairs never leak into a pair's cache.
    for index, (prompt, other) in enumerate(PAIRS):
        single, single_c = _encode(tiny_tokenizer, [prompt]), _encode(tiny_tokenizer, [other])
        alone, _ = _run(tiny_llama, single, single_c, steps=8, num_beams=3, alpha=0.05)
        assert _generated(alone, single)[0] == _generated(first, batch)[index]


def test_seeded_sampling_is_reproducible(tiny_llama, tiny_tokenizer):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE)

    def run(seed):
        torch.manual_seed(seed)
        return _run(tiny_llama, batch, contrastive, do_sample=True, top_p=0.9, alpha=0.05)[0]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize(
    "kwargs, message", [(dict(cid_lambda=-1.0), "lambda"), (dict(alpha=0.0), "alpha"), (dict(alpha=2.0), "alpha")]
)
def test_bad_hyperparameters_are_rejected(tiny_llama, tiny_tokenizer, kwargs, message):
    contrastive = _encode(tiny_tokenizer, CONTRASTIVE)
    with pytest.raises(ValueError, match=message):
        ContrastiveInputLogitsProcessor(tiny_llama, contrastive["input_ids"], **kwargs)
    with pytest.raises(ValueError, match=message):
        ContrastiveInputMethod(tiny_llama, tiny_tokenizer, **kwargs)


def test_batch_size_mismatch_is_an_error(tiny_llama, tiny_tokenizer):
    batch, contrastive = _encode(tiny_tokenizer, PROMPTS), _encode(tiny_tokenizer, CONTRASTIVE[:2])
    with pytest.raises(ValueError, match="batch size 2"):
        _run(tiny_llama, batch, contrastive)
    one = _encode(tiny_tokenizer, CONTRASTIVE[:1])  # 3 rows would divide by 1: still caught
    with pytest.raises(ValueError, match="batch size 1"):
        _run(tiny_llama, batch, one)
    method = ContrastiveInputMethod(tiny_llama, tiny_tokenizer)
    with pytest.raises(ValueError, match="2 contrastive inputs for a batch of 3"):
        method.generate_kwargs(batch, contrastive)


def test_registry_method_runs_through_the_shared_runner(tiny_llama, tiny_tokenizer):
    assert get_method("cid") is ContrastiveInputMethod
    method = ContrastiveInputMethod(tiny_llama, tiny_tokenizer, cid_lambda=1.0, alpha=0.1)
    results, _ = run_generate(
        tiny_llama, tiny_tokenizer, PROMPTS, method, max_new_tokens=10, batch_size=2, contrastive_prompts=CONTRASTIVE
    )
    for (prompt, other), result in zip(PAIRS, results):
        ids, other_ids = tiny_tokenizer(prompt)["input_ids"], tiny_tokenizer(other)["input_ids"]
        reference = naive_cid_greedy(tiny_llama, ids, other_ids, 10, lam=1.0, alpha=0.1)
        assert result.token_ids == [t for t in reference if t != EOS]
    with pytest.raises(ValueError, match="contrastive prompt"):
        run_generate(tiny_llama, tiny_tokenizer, PROMPTS, method, max_new_tokens=4)


@pytest.mark.real_model
def test_smollm2_matches_naive_reference(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    pairs = [
        ("Write one sentence about the sea:", "Write one sentence:"),
        ("The best programming language is", "The best"),
    ]
    batch = tokenizer([p for p, _ in pairs], return_tensors="pt", padding=True)
    contrastive = tokenizer([c for _, c in pairs], return_tensors="pt", padding=True)
    processor = ContrastiveInputLogitsProcessor(
        model, contrastive["input_ids"], contrastive["attention_mask"], cid_lambda=0.5
    )
    out = model.generate(
        **batch, max_new_tokens=10, do_sample=False, logits_processor=LogitsProcessorList([processor])
    )
    eos = model.generation_config.eos_token_id
    for (prompt, other), row in zip(pairs, out[:, batch["input_ids"].shape[1] :].tolist()):
        x, x_c = tokenizer(prompt)["input_ids"], tokenizer(other)["input_ids"]
        generated = []
        for _ in range(10):
            p_x = torch.softmax(_last_logits(model, x + generated), -1)
            p_c = torch.softmax(_last_logits(model, x_c + generated), -1)
            scores = torch.log(p_x) - 0.5 * torch.log(p_c)
            scores[p_x < 0.1 * p_x.max()] = -math.inf
            generated.append(int(scores.argmax()))
            if generated[-1] == eos:
                break
        assert row[: len(generated)] == generated
