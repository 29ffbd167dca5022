"""Open-ended text quality metrics: exact values on hand-built inputs, and equivalences on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.eval_harness import text_quality as tq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ngram_counts_follow_simctg_which_skips_each_texts_last_ngram():
    tokens = "a b a b a b".split()
    # start positions 0..3: ab ba ab ba -> 2 distinct of 4
    assert tq.ngram_counts(tokens, 2) == (2, 4)
    # the textbook count also has the fifth bigram (ab)
    assert tq.ngram_counts(tokens, 2, include_last_ngram=True) == (2, 5)
    assert tq.ngram_counts(tokens, 3) == (2, 3)  # aba bab aba
    assert tq.ngram_counts(tokens, 4) == (2, 2)  # abab baba
    assert tq.ngram_counts(tokens, 6) == (0, 0)
    assert tq.ngram_counts(["x"], 2) == (0, 0)
    with pytest.raises(ValueError, match="order"):
        tq.ngram_counts(tokens, 0)


def test_repetition_is_pooled_over_texts_not_averaged():
    texts = [tq.words(" a b a b a b\n"), tq.words("x y z")]
    stats = tq.repetition_stats(texts)
    # rep-2: 1 - (2 + 1) / (4 + 1); rep-3: 1 - (2 + 0) / (3 + 0); rep-4: 1 - 2 / 2
    assert stats["rep-2"] == pytest.approx(0.4)
    assert stats["rep-3"] == pytest.approx(1 / 3)
    assert stats["rep-4"] == pytest.approx(0.0)
    assert stats["diversity"] == pytest.approx(0.6 * (2 / 3) * 1.0)
    # a per-text mean would give rep-2 = (0.5 + 0) / 2 = 0.25: the pooled value differs
    assert stats["rep-2"] != pytest.approx(0.25)


def test_repetition_of_a_degenerate_loop_and_of_texts_without_ngrams():
    loop = tq.words("the towering silhouette of " * 8)
    stats = tq.repetition_stats([loop])
    # 32 words, 4 distinct n-grams of every order (the loop has period 4)
    assert stats["rep-2"] == pytest.approx(1 - 4 / 30)
    assert stats["rep-4"] == pytest.approx(1 - 4 / 28)
    assert math.isnan(tq.repetition([["one"], []], 2))


def test_coherence_and_perplexity_exact_values():
    prompts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    continuations = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    assert tq.coherence(prompts, continuations) == pytest.approx([1 / math.sqrt(2), -1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        tq.coherence(prompts, continuations[:1])
    assert tq.perplexity([2.0, 4.0, 0.0], [1, 2, 0]) == pytest.approx(math.exp(2.0))
    assert math.isnan(tq.perplexity([0.0], [0]))


def test_mauve_separates_same_distribution_from_shifted_one_and_is_deterministic():
    pytest.importorskip("mauve")
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(200, 8, generator=generator)
    same = torch.randn(200, 8, generator=generator)
    far = torch.randn(200, 8, generator=generator) + 3.0
    close_score = tq.mauve_score(p, same)
    assert close_score > 0.8
    assert tq.mauve_score(p, far) < 0.1
    assert tq.mauve_score(p, same) == close_score  # fixed k-means seed
    with pytest.raises(ValueError, match="same dim"):
        tq.mauve_score(p, p[:, :4])


def test_document_nll_batched_equals_one_sequence_at_a_time(tiny_llama, tiny_tokenizer):
    prompts = ["The quick brown fox", "A", "Contrastive decoding compares two models"]
    continuations = [" jumps over the lazy dog.", "", " and the amateur"]
    batched = tq.score_documents(tiny_llama, tiny_tokenizer, prompts, continuations, batch_size=3).nll
    assert batched[1] == (0.0, 0)
    for (nll, count), prompt, continuation in zip(batched, prompts, continuations):
        if not continuation:
            continue
        context = tiny_tokenizer(prompt)["input_ids"]
        target = tiny_tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_llama(ids).logits[0].float(), dim=-1)
        naive = -sum(float(log_probs[len(context) - 1 + j, token]) for j, token in enumerate(target))
        assert count == len(target)
        assert nll == pytest.approx(naive, rel=1e-4)


def test_hidden_state_features_do_not_depend_on_batching_or_padding(tiny_llama, tiny_tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.", "A dog.", "Contrastive decoding"]
    batched = tq.HiddenStateFeatures(tiny_llama, tiny_tokenizer, batch_size=3)
    single = tq.HiddenStateFeatures(tiny_llama, tiny_tokenizer, batch_size=1)
    torch.testing.assert_close(batched.mean_pooled(texts), single.mean_pooled(texts), rtol=1e-4, atol=1e-4)


def test_document_features_are_the_last_position_of_prompt_plus_continuation(tiny_llama, tiny_tokenizer):
    prompts = ["The quick brown fox", "A", "Contrastive decoding"]
    continuations = [" jumps over the lazy dog.", "", " compares two models"]
    batched = tq.score_documents(tiny_llama, tiny_tokenizer, prompts, continuations, batch_size=3)
    without_nll = tq.score_documents(tiny_llama, tiny_tokenizer, prompts, continuations, batch_size=1, with_nll=False)
    torch.testing.assert_close(batched.features, without_nll.features, rtol=1e-4, atol=1e-4)
    assert without_nll.nll == [(0.0, 0)] * 3
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        ids = tiny_tokenizer(prompt)["input_ids"] + tiny_tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = tiny_llama.get_decoder()(torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(batched.features[row], expected, rtol=1e-5, atol=1e-5)
