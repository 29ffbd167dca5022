"""Shared-context continuation scoring equals naive per-choice full forwards (the lm-eval computation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cdlm import testing
from cdlm.eval_harness import scoring
from cdlm.eval_harness.scoring import can_pack, encode_pair, encode_request, score_requests
from cdlm.models import EarlyExitAmateur

CONTEXTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog and", "Hi there ", "A"]
CHOICES = [" a cat sat", " the dog ran away", " x"]


def _full_forward_loglik(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logprobs[len(context_ids) - 1 + i, t].item() for i, t in enumerate(continuation_ids))


def test_encode_pair_moves_trailing_space_and_splits_like_lm_eval(tiny_tokenizer):
    context, continuation = encode_pair(tiny_tokenizer, "Hi there ", "you")
    assert context == tiny_tokenizer.encode("Hi there")
    whole = tiny_tokenizer.encode("Hi there you")
    assert continuation == whole[len(context) :]
    empty_context, _ = encode_pair(tiny_tokenizer, "", "abc")
    assert empty_context == [tiny_tokenizer.bos_token_id]


def _model(kind: str):
    if kind == "llama":
        return testing.tiny_llama(seed=0)
    if kind == "llama-eager":
        model = testing.tiny_llama(seed=0)
        model.config._attn_implementation = "eager"
        return model
    if kind == "gemma3-wide-window":  # every context + choice fits the window: packed rows are exact
        return testing.tiny_gemma3(seed=0, sliding_window=64)
    return testing.tiny_gemma3(seed=0)  # window 8: longer rows must take the two-pass path


@pytest.mark.parametrize(
    "kind, batch_size, packed",
    [
        ("llama", 3, True),
        ("llama", 1, True),
        ("llama-eager", 2, True),
        ("gemma3-wide-window", 3, True),
        ("gemma3", 3, False),
    ],
)
def test_shared_context_equals_naive_full_forwards(tiny_tokenizer, kind, batch_size, packed):
    model = _model(kind)
    requests = [encode_request(tiny_tokenizer, c, CHOICES) for c in CONTEXTS]
    assert can_pack(model, requests) is packed
    shared, _ = score_requests(model, tiny_tokenizer, requests, batch_size=batch_size)
    for req, scores in zip(requests, shared):
        for cont, score in zip(req.continuations, scores):
            assert score.loglikelihood == pytest.approx(_full_forward_loglik(model, req.context, cont), abs=1e-4)
            assert score.num_tokens == len(cont)
    naive, _ = score_requests(model, tiny_tokenizer, requests, batch_size=batch_size, shared_context=False)
    assert [[s.is_greedy for s in row] for row in shared] == [[s.is_greedy for s in row] for row in naive]


def test_two_pass_path_equals_packed_path(tiny_tokenizer, monkeypatch):
    model = testing.tiny_llama(seed=2)
    requests = [encode_request(tiny_tokenizer, c, CHOICES) for c in CONTEXTS]
    packed, _ = score_requests(model, tiny_tokenizer, requests, batch_size=3)
    monkeypatch.setattr(scoring, "can_pack", lambda model, requests: False)
    two_pass, _ = score_requests(model, tiny_tokenizer, requests, batch_size=3)
    for row_p, row_t in zip(packed, two_pass):
        for p, t in zip(row_p, row_t):
            assert p.loglikelihood == pytest.approx(t.loglikelihood, abs=1e-4) and p.is_greedy == t.is_greedy


@pytest.mark.parametrize("packed", [True, False])
def test_early_exit_amateur_scores_match_the_standalone_truncated_model(tiny_tokenizer, monkeypatch, packed):
    model = testing.tiny_llama(seed=1)
    amateur = EarlyExitAmateur(model, 2)
    requests = [encode_request(tiny_tokenizer, c, CHOICES) for c in CONTEXTS]
    if not packed:
        monkeypatch.setattr(scoring, "can_pack", lambda model, requests: False)
    _, captured = score_requests(model, tiny_tokenizer, requests, batch_size=2, early_exit=amateur)
    standalone, _ = score_requests(amateur.model, tiny_tokenizer, requests, batch_size=2, shared_context=False)
    for row_a, row_b in zip(captured, standalone):
        for a, b in zip(row_a, row_b):
            assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-4)
    expert, _ = score_requests(model, tiny_tokenizer, requests, batch_size=2)
    assert any(
        abs(a.loglikelihood - e.loglikelihood) > 1e-2 for ra, re in zip(captured, expert) for a, e in zip(ra, re)
    )


def test_greedy_flag_is_true_for_the_models_own_argmax_continuation(tiny_llama, tiny_tokenizer):
    context = tiny_tokenizer.encode("The quick brown")
    with torch.inference_mode():
        generated = tiny_llama.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False)[
            0, len(context) :
        ].tolist()
    text = tiny_tokenizer.decode(generated)
    request = encode_request(tiny_tokenizer, "The quick brown", [text, text + "zzz"])
    if request.continuations[0] != generated:
        pytest.skip("decoded text re-tokenises differently")
    scores, _ = score_requests(tiny_llama, tiny_tokenizer, [request])
    assert scores[0][0].is_greedy


FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_hellaswag_smollm2.json"


@pytest.mark.real_model
@pytest.mark.skipif(not FIXTURE.exists(), reason="run benchmarks/lm_eval_agreement.py --write-fixture K to record it")
def test_smollm2_hellaswag_logliks_match_stored_lm_eval_values(smollm2):
    """Stored lm-eval 0.4.13 per-choice log-likelihoods (same tokens) are reproduced within 1e-3."""
    fixture = json.loads(FIXTURE.read_text())
    requests = [
        encode_request(smollm2.tokenizer, d["query"], [" " + c for c in d["choices"]]) for d in fixture["docs"]
    ]
    for request, doc in zip(requests, fixture["docs"]):
        assert request.context == doc["context_ids"] and request.continuations == doc["continuation_ids"]
    scores, _ = score_requests(smollm2.model, smollm2.tokenizer, requests, batch_size=4)
    for row, doc in zip(scores, fixture["docs"]):
        for score, expected in zip(row, doc["lm_eval_loglikelihoods"]):
            assert score.loglikelihood == pytest.approx(expected, abs=1e-3)
