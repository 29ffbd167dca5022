"""Contrastive decoding processors against a deliberately naive reference, plus their invariants.

The reference below recomputes everything from scratch at every step, one prompt at a time and
without padding, and writes each formula the way its paper does (probabilities for Li et al.,
raw logits for O'Brien & Lewis). It shares no code with ``cdlm.decoding``.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from transformers import LogitsProcessorList

from cdlm import testing
from cdlm.decoding.contrastive_decoding import (
    ContrastiveDecodingLogitsProcessor,
    EarlyExitContrastiveLogitsProcessor,
    contrastive_decoding_processor,
)
from cdlm.decoding.methods import ContrastiveDecodingMethod, get_method
from cdlm.decoding.runner import generate as run_generate
from cdlm.models import (
    CannotSplitModelError,
    EarlyExitAmateur,
    SeparateAmateur,
    TokenizerMismatchError,
    make_separate_amateur,
)

PROMPTS = [
    "The quick brown fox",
    "Question: Natalia sold clips to 48 of her friends in April.",
    "Human: How do I bake bread?",
]
EOS = testing.EOS_ID


# ---------------------------------------------------------------------------------------------- reference
def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def naive_cd_scores(expert_logits, amateur_logits, *, formulation, alpha, beta, tau):
    """One step of CD exactly as the papers write it (no log-softmax trick, no shared helpers)."""
    vocab = min(expert_logits.shape[0], amateur_logits.shape[0])
    e, a = expert_logits[:vocab], amateur_logits[:vocab]
    if formulation == "li":
        p_e = torch.softmax(e, -1)
        keep = p_e >= alpha * p_e.max()
        scores = torch.log(p_e) - torch.log_softmax(a / tau, -1)
    else:  # O'Brien & Lewis 2023, Algorithm 1 (raw logits)
        keep = e >= math.log(alpha) + e.max()
        scores = (1 + beta) * e - beta * (a / tau)
    out = torch.full((expert_logits.shape[0],), -math.inf)
    out[:vocab] = torch.where(keep, scores, torch.tensor(-math.inf))
    return out


def naive_cd_greedy(expert, amateur, prompt_ids, steps, *, repetition_penalty=None, **hp):
    ids = list(prompt_ids)
    for _ in range(steps):
        e = _last_logits(expert, ids)
        if repetition_penalty is not None:
            seen = torch.tensor(sorted(set(ids)))
            values = e[seen]
            e[seen] = torch.where(values < 0, values * repetition_penalty, values / repetition_penalty)
        token = int(naive_cd_scores(e, _last_logits(amateur, ids), **hp).argmax())
        ids.append(token)
        if token == EOS:
            break
    return ids[len(prompt_ids) :]


def naive_cd_beam(expert, amateur, prompt_ids, steps, beams, *, formulation, alpha, beta, tau, banned=(EOS,)):
    """Plain beam search on summed CD scores (start from one beam, keep the best `beams` each step).

    Under beam search generate() hands processors log-probs (here with the banned ids already at
    -inf), and the processor's documented per-token score is on normalised distributions:
    lp_e - lp_a (Li) or (1 + beta) lp_e - beta lp_a (O'Brien-Lewis).
    """
    running = [(0.0, list(prompt_ids))]
    for _ in range(steps):
        candidates = []
        for score, ids in running:
            step = torch.log_softmax(_last_logits(expert, ids), -1)
            step[list(banned)] = -math.inf
            lp_e = torch.log_softmax(step, -1)
            lp_a = torch.log_softmax(_last_logits(amateur, ids) / tau, -1)
            keep = lp_e.exp() >= alpha * lp_e.exp().max()
            contrast = lp_e - lp_a if formulation == "li" else (1 + beta) * lp_e - beta * lp_a
            contrast = torch.where(keep, contrast, torch.tensor(-math.inf))
            values, tokens = contrast.topk(beams)
            candidates += [(score + float(v), ids + [int(t)]) for v, t in zip(values, tokens) if math.isfinite(v)]
        candidates.sort(key=lambda c: c[0], reverse=True)
        running = candidates[:beams]
    return running[0][1][len(prompt_ids) :]


def _cut_at_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _batch(tokenizer, prompts=PROMPTS):
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _generated(output, batch) -> list[list[int]]:
    return [_cut_at_eos(row) for row in output[:, batch["input_ids"].shape[1] :].tolist()]


def _prompt_ids(tokenizer, prompt) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def _cd_generate(expert, processor, batch, steps=12, **kwargs):
    kwargs.setdefault("do_sample", False)
    return expert.generate(**batch, max_new_tokens=steps, logits_processor=LogitsProcessorList([processor]), **kwargs)


@pytest.fixture(scope="module")
def amateur():
    return testing.tiny_llama(seed=1)


# ---------------------------------------------------------------------------------------------- equivalences
SETTINGS = [
    dict(formulation="obrien-lewis", alpha=0.1, beta=0.5, tau=1.0),
    dict(formulation="obrien-lewis", alpha=0.05, beta=2.0, tau=0.7),
    dict(formulation="li", alpha=0.1, beta=0.5, tau=1.0),
    dict(formulation="li", alpha=0.02, beta=0.5, tau=0.5),
]


@pytest.mark.parametrize(
    "hp", SETTINGS, ids=lambda hp: f"{hp['formulation']}-a{hp['alpha']}-b{hp['beta']}-t{hp['tau']}"
)
def test_batched_processor_matches_naive_reference(tiny_llama, amateur, tiny_tokenizer, hp):
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(
        amateur,
        alpha=hp["alpha"],
        beta=hp["beta"],
        formulation=hp["formulation"],
        amateur_temperature=hp["tau"],
        attention_mask=batch["attention_mask"],
    )
    got = _generated(_cd_generate(tiny_llama, processor, batch), batch)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == naive_cd_greedy(tiny_llama, amateur, _prompt_ids(tiny_tokenizer, prompt), 12, **hp)
    assert processor.branch.recomputations == 0  # the cache was extended, never rebuilt


def test_gemma3_sliding_window_matches_naive_reference(tiny_tokenizer):
    expert, amateur_model = testing.tiny_gemma3(seed=0), testing.tiny_gemma3(seed=1)
    hp = dict(formulation="obrien-lewis", alpha=0.1, beta=1.0, tau=1.0)
    batch = _batch(tiny_tokenizer)  # prompts and generations longer than the sliding window of 8
    processor = ContrastiveDecodingLogitsProcessor(
        amateur_model, alpha=0.1, beta=1.0, formulation="obrien-lewis", attention_mask=batch["attention_mask"]
    )
    got = _generated(_cd_generate(expert, processor, batch, steps=10), batch)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == naive_cd_greedy(expert, amateur_model, _prompt_ids(tiny_tokenizer, prompt), 10, **hp)


def test_alongside_repetition_penalty_matches_reference(tiny_llama, amateur, tiny_tokenizer):
    hp = dict(formulation="li", alpha=0.1, beta=0.5, tau=1.0)
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(amateur, formulation="li", attention_mask=batch["attention_mask"])
    got = _generated(_cd_generate(tiny_llama, processor, batch, repetition_penalty=1.5), batch)
    for prompt, tokens in zip(PROMPTS, got):
        ref = naive_cd_greedy(
            tiny_llama, amateur, _prompt_ids(tiny_tokenizer, prompt), 12, repetition_penalty=1.5, **hp
        )
        assert tokens == ref


def test_batched_left_padded_equals_each_prompt_alone(tiny_llama, amateur, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    together = _generated(
        _cd_generate(
            tiny_llama, ContrastiveDecodingLogitsProcessor(amateur, attention_mask=batch["attention_mask"]), batch
        ),
        batch,
    )
    for prompt, tokens in zip(PROMPTS, together):
        single = _batch(tiny_tokenizer, [prompt])
        alone = _generated(_cd_generate(tiny_llama, ContrastiveDecodingLogitsProcessor(amateur), single), single)
        assert alone[0] == tokens


def test_inferred_left_padding_equals_given_mask(tiny_llama, amateur, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    given = _cd_generate(
        tiny_llama, ContrastiveDecodingLogitsProcessor(amateur, attention_mask=batch["attention_mask"]), batch
    )
    inferred = _cd_generate(
        tiny_llama, ContrastiveDecodingLogitsProcessor(amateur, pad_token_id=testing.PAD_ID), batch
    )
    assert torch.equal(given, inferred)


def test_beta_zero_is_plain_greedy(tiny_llama, amateur, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    greedy = tiny_llama.generate(**batch, max_new_tokens=12, do_sample=False)
    processor = ContrastiveDecodingLogitsProcessor(
        amateur, beta=0.0, formulation="obrien-lewis", attention_mask=batch["attention_mask"]
    )
    assert torch.equal(_cd_generate(tiny_llama, processor, batch), greedy)


@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_identical_expert_and_amateur_obrien_lewis_is_greedy(tiny_llama, tiny_tokenizer, beta):
    """(1 + b) s - b s = s: with the amateur equal to the expert, CD is greedy (its argmax is plausible)."""
    batch = _batch(tiny_tokenizer)
    greedy = tiny_llama.generate(**batch, max_new_tokens=12, do_sample=False)
    twin = testing.tiny_llama(seed=0)  # same weights, separate object and cache
    processor = ContrastiveDecodingLogitsProcessor(
        twin, beta=beta, formulation="obrien-lewis", attention_mask=batch["attention_mask"]
    )
    assert torch.equal(_cd_generate(tiny_llama, processor, batch), greedy)


@pytest.mark.parametrize("hp", SETTINGS[::2], ids=lambda hp: hp["formulation"])
def test_every_step_scores_equal_the_papers_formula(tiny_llama, amateur, tiny_tokenizer, hp):
    """The scores handed to generate() at every step, row by row, against the paper's formula on the
    row's unpadded prefix (O'Brien-Lewis up to the per-row constant the docstring allows), and the
    outputs differ from greedy so the comparison is not vacuous."""
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(
        amateur,
        formulation=hp["formulation"],
        alpha=hp["alpha"],
        beta=hp["beta"],
        attention_mask=batch["attention_mask"],
    )
    out = _cd_generate(tiny_llama, processor, batch, steps=6, output_scores=True, return_dict_in_generate=True)
    prompt_len = batch["input_ids"].shape[1]
    for row in range(len(PROMPTS)):
        real = out.sequences[row][batch["attention_mask"][row].bool().tolist() + [True] * 6].tolist()
        start = int(batch["attention_mask"][row].sum())
        for step, scores in enumerate(out.scores):
            expected = naive_cd_scores(
                _last_logits(tiny_llama, real[: start + step]), _last_logits(amateur, real[: start + step]), **hp
            )
            got = scores[row]
            assert torch.equal(torch.isinf(got), torch.isinf(expected))
            finite = torch.isfinite(expected)
            offset = (got[finite] - expected[finite]).mean() if hp["formulation"] == "obrien-lewis" else 0.0
            torch.testing.assert_close(got[finite] - offset, expected[finite], atol=1e-4, rtol=1e-4)
    greedy = tiny_llama.generate(**batch, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out.sequences[:, prompt_len:], greedy[:, prompt_len:])


def test_amateur_vocabulary_range_is_respected(tiny_tokenizer, amateur):
    """An expert whose lm_head is padded past the amateur's: contrast on the common ids, -inf above."""
    padded_expert = testing.tiny_llama(seed=0, vocab_size=400)
    hp = dict(formulation="li", alpha=0.3, beta=0.5, tau=1.0)
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(
        amateur, formulation="li", alpha=0.3, attention_mask=batch["attention_mask"], vocab_size=384
    )
    out = _cd_generate(padded_expert, processor, batch, output_scores=True, return_dict_in_generate=True)
    assert all(step.shape[1] == 400 and torch.isinf(step[:, 384:]).all() for step in out.scores)
    for prompt, tokens in zip(PROMPTS, _generated(out.sequences, batch)):
        assert max(tokens) < 384
        assert tokens == naive_cd_greedy(padded_expert, amateur, _prompt_ids(tiny_tokenizer, prompt), 12, **hp)


def test_separate_amateur_vocab_size_limits_the_range(tiny_llama, tiny_tokenizer):
    wrapped = SeparateAmateur(testing.tiny_llama(seed=1), tiny_tokenizer, "seed1", vocab_size=200)
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(wrapped, formulation="li", attention_mask=batch["attention_mask"])
    out = _cd_generate(tiny_llama, processor, batch)
    assert out[:, batch["input_ids"].shape[1] :].max() < 200


def test_amateur_in_another_dtype(tiny_llama, tiny_tokenizer):
    """A bfloat16 amateur beside a float32 expert: same tokens as the reference using that amateur."""
    low = testing.tiny_llama(seed=1).to(torch.bfloat16)
    hp = dict(formulation="obrien-lewis", alpha=0.1, beta=0.5, tau=1.0)
    batch = _batch(tiny_tokenizer, PROMPTS[:2])
    processor = ContrastiveDecodingLogitsProcessor(
        low, formulation="obrien-lewis", attention_mask=batch["attention_mask"]
    )
    got = _generated(_cd_generate(tiny_llama, processor, batch, steps=6), batch)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == naive_cd_greedy(tiny_llama, low, _prompt_ids(tiny_tokenizer, prompt), 6, **hp)


def test_reusing_a_processor_with_its_mask_on_another_batch_is_refused(tiny_llama, amateur, tiny_tokenizer):
    """Issue 15.3: the mask given at construction belongs to that batch; another batch of the same shape
    used to be decoded silently with it."""
    first = _batch(tiny_tokenizer, [PROMPTS[0], PROMPTS[2]])
    second = _batch(tiny_tokenizer, [PROMPTS[2], PROMPTS[0]])  # same shape, padding in other rows
    assert first["input_ids"].shape == second["input_ids"].shape
    assert not torch.equal(first["attention_mask"], second["attention_mask"])
    processor = ContrastiveDecodingLogitsProcessor(amateur, attention_mask=first["attention_mask"])
    _cd_generate(tiny_llama, processor, first)
    assert torch.equal(
        _cd_generate(tiny_llama, processor, first),
        _cd_generate(
            tiny_llama, ContrastiveDecodingLogitsProcessor(amateur, attention_mask=first["attention_mask"]), first
        ),
    )
    with pytest.raises(ValueError, match="attention_mask of another batch"):
        _cd_generate(tiny_llama, processor, second)


def test_bare_amateur_with_another_vocabulary_is_refused(tiny_llama, amateur, tiny_tokenizer, tmp_path):
    """Issue 15.4: a bare amateur model of another vocabulary used to decode without complaint."""
    batch = _batch(tiny_tokenizer)
    big = testing.tiny_gemma3(seed=0, vocab_size=512)
    processor = ContrastiveDecodingLogitsProcessor(big, attention_mask=batch["attention_mask"])
    with pytest.raises(TokenizerMismatchError, match="scores 512 token ids but the expert scores 384"):
        _cd_generate(tiny_llama, processor, batch)
    with pytest.raises(TokenizerMismatchError, match="512 token ids"):
        ContrastiveDecodingLogitsProcessor(big, expert=tiny_llama)
    # Same head size, different special tokens: caught when the expert is given.
    other_eos = testing.tiny_llama(seed=1)
    other_eos.generation_config.eos_token_id = 3
    with pytest.raises(TokenizerMismatchError, match="eos_token_id: \\[2\\] vs \\[3\\]"):
        ContrastiveDecodingLogitsProcessor(other_eos, expert=tiny_llama)
    # Same head size and special tokens, but the models' own tokenizer files differ.
    expert_dir, amateur_dir = tmp_path / "expert", tmp_path / "amateur"
    tiny_llama.save_pretrained(expert_dir)
    tiny_tokenizer.save_pretrained(expert_dir)
    testing.tiny_llama(seed=1).save_pretrained(amateur_dir)
    testing.tiny_tokenizer(vocab_size=300).save_pretrained(amateur_dir)
    from transformers import AutoModelForCausalLM

    expert_loaded = AutoModelForCausalLM.from_pretrained(expert_dir)
    amateur_loaded = AutoModelForCausalLM.from_pretrained(amateur_dir)
    with pytest.raises(TokenizerMismatchError, match="tokenizers of expert and .*amateur"):
        ContrastiveDecodingLogitsProcessor(amateur_loaded, expert=expert_loaded)
    # The matching pair passes every check and decodes as before.
    same_dir = tmp_path / "same"
    testing.tiny_llama(seed=1).save_pretrained(same_dir)
    tiny_tokenizer.save_pretrained(same_dir)
    ok = ContrastiveDecodingLogitsProcessor(
        AutoModelForCausalLM.from_pretrained(same_dir), expert=expert_loaded, attention_mask=batch["attention_mask"]
    )
    reference = ContrastiveDecodingLogitsProcessor(amateur, attention_mask=batch["attention_mask"])
    assert torch.equal(_cd_generate(tiny_llama, ok, batch), _cd_generate(tiny_llama, reference, batch))


def test_reusing_a_processor_restarts_on_a_new_prompt(tiny_llama, amateur, tiny_tokenizer):
    processor = ContrastiveDecodingLogitsProcessor(amateur, pad_token_id=testing.PAD_ID)
    first, second = _batch(tiny_tokenizer, PROMPTS[:2]), _batch(tiny_tokenizer, PROMPTS[1:])
    _cd_generate(tiny_llama, processor, first)
    reused = _cd_generate(tiny_llama, processor, second)
    fresh = _cd_generate(tiny_llama, ContrastiveDecodingLogitsProcessor(amateur, pad_token_id=testing.PAD_ID), second)
    assert torch.equal(reused, fresh)


# ---------------------------------------------------------------------------------------------- beams, sampling
@pytest.mark.parametrize("formulation", ["li", "obrien-lewis"])
def test_beam_search_matches_naive_beam_reference(tiny_llama, amateur, tiny_tokenizer, formulation):
    hp = dict(formulation=formulation, alpha=0.05, beta=0.5, tau=1.0)
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(
        amateur, formulation=formulation, alpha=0.05, attention_mask=batch["attention_mask"]
    )
    out = _cd_generate(tiny_llama, processor, batch, steps=8, num_beams=3, suppress_tokens=[EOS])
    assert processor.branch.reorders > 0 and processor.branch.recomputations == 0
    got = _generated(out, batch)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == naive_cd_beam(tiny_llama, amateur, _prompt_ids(tiny_tokenizer, prompt), 8, 3, **hp)


def test_beam_search_is_reproducible_and_differs_from_plain_beams(tiny_llama, amateur, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)

    def run():
        processor = ContrastiveDecodingLogitsProcessor(
            amateur, formulation="li", attention_mask=batch["attention_mask"]
        )
        return _cd_generate(tiny_llama, processor, batch, steps=8, num_beams=4, num_return_sequences=2)

    first, second = run(), run()
    assert torch.equal(first, second) and first.shape[0] == 2 * len(PROMPTS)
    assert not torch.equal(first, tiny_llama.generate(**batch, max_new_tokens=8, num_beams=4, num_return_sequences=2))


def test_seeded_sampling_is_reproducible_and_stays_in_the_plausible_set(tiny_llama, amateur, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)

    def run(seed):
        torch.manual_seed(seed)
        processor = ContrastiveDecodingLogitsProcessor(amateur, alpha=0.2, attention_mask=batch["attention_mask"])
        return _cd_generate(
            tiny_llama,
            processor,
            batch,
            do_sample=True,
            temperature=1.3,
            top_k=20,
            output_scores=True,
            return_dict_in_generate=True,
        )

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first.sequences, second.sequences)
    assert not torch.equal(first.sequences, other.sequences)
    for row, tokens in enumerate(_generated(first.sequences, batch)):  # every sampled token was plausible
        for step, token in enumerate(tokens):
            assert math.isfinite(float(first.scores[step][row, token]))


# ---------------------------------------------------------------------------------------------- early exit
@pytest.mark.parametrize("factory", [testing.tiny_llama, testing.tiny_gemma3])
@pytest.mark.parametrize("formulation", ["li", "obrien-lewis"])
def test_early_exit_processor_equals_separate_shell_amateur(factory, formulation, tiny_tokenizer):
    expert = factory(seed=0)
    early = EarlyExitAmateur(expert, 2)
    batch = _batch(tiny_tokenizer)
    with EarlyExitContrastiveLogitsProcessor(early, formulation=formulation) as processor:
        hooked = _cd_generate(expert, processor, batch, steps=14)
    separate = ContrastiveDecodingLogitsProcessor(
        early.model, formulation=formulation, attention_mask=batch["attention_mask"]
    )
    assert torch.equal(hooked, _cd_generate(expert, separate, batch, steps=14))
    assert not torch.equal(hooked, expert.generate(**batch, max_new_tokens=14, do_sample=False))


def test_early_exit_with_beam_search_equals_separate_shell_amateur(tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    early = EarlyExitAmateur(expert, 1)
    batch = _batch(tiny_tokenizer)
    with EarlyExitContrastiveLogitsProcessor(early, alpha=0.05) as processor:
        hooked = _cd_generate(expert, processor, batch, steps=8, num_beams=3)
    separate = ContrastiveDecodingLogitsProcessor(early.model, alpha=0.05, attention_mask=batch["attention_mask"])
    assert torch.equal(hooked, _cd_generate(expert, separate, batch, steps=8, num_beams=3))


def _hook_count(amateur: EarlyExitAmateur) -> int:
    return len(amateur.model.get_decoder().layers[amateur.exit_layer - 1]._forward_hooks)


def test_early_exit_hook_lifetime(tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    early = EarlyExitAmateur(expert, 2)
    batch = _batch(tiny_tokenizer)
    with EarlyExitContrastiveLogitsProcessor(early) as processor:
        assert _hook_count(early) == 1
    assert _hook_count(early) == 0 and not processor.attached
    with pytest.raises(RuntimeError, match="closed"):
        _cd_generate(expert, processor, batch)
    processor = EarlyExitContrastiveLogitsProcessor(early)
    _cd_generate(expert, processor, batch)
    del processor
    gc.collect()
    assert _hook_count(early) == 0  # garbage collection removes a forgotten processor's hook


def test_early_exit_processor_on_the_wrong_model_is_an_error(tiny_tokenizer):
    early = EarlyExitAmateur(testing.tiny_llama(seed=0), 2)
    other = testing.tiny_llama(seed=3)
    with EarlyExitContrastiveLogitsProcessor(early) as processor, pytest.raises(RuntimeError, match="expert model"):
        _cd_generate(other, processor, _batch(tiny_tokenizer))


def test_factory_picks_the_processor_kind(tiny_llama, amateur):
    early = EarlyExitAmateur(testing.tiny_llama(seed=0), 2)
    with contrastive_decoding_processor(early, alpha=0.2) as processor:
        assert isinstance(processor, EarlyExitContrastiveLogitsProcessor) and processor.alpha == 0.2
    assert isinstance(contrastive_decoding_processor(amateur), ContrastiveDecodingLogitsProcessor)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(beta=-0.1), "beta"),
        (dict(amateur_temperature=0.0), "amateur_temperature"),
        (dict(formulation="plain"), "formulation"),
    ],
)
def test_bad_hyperparameters_are_rejected(amateur, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveDecodingLogitsProcessor(amateur, **kwargs)
    method_kwargs = {{"formulation": "cd_formulation"}.get(k, k): v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        ContrastiveDecodingMethod(
            testing.tiny_llama(seed=0), testing.tiny_tokenizer(), amateur=amateur, **method_kwargs
        )


def test_wrong_attention_mask_shape_is_an_error(tiny_llama, amateur, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    processor = ContrastiveDecodingLogitsProcessor(amateur, attention_mask=batch["attention_mask"][:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        _cd_generate(tiny_llama, processor, batch)


def test_early_exit_amateur_passed_to_the_cached_processor_is_an_error(tiny_llama):
    with pytest.raises(TypeError, match="EarlyExitContrastiveLogitsProcessor"):
        ContrastiveDecodingLogitsProcessor(EarlyExitAmateur(tiny_llama, 2))


def test_unsplittable_expert_and_tokenizer_mismatch_are_reported(tiny_llama, tiny_tokenizer):
    with pytest.raises(CannotSplitModelError, match="1..3"):
        EarlyExitAmateur(tiny_llama, 4)
    other_tokenizer = testing.tiny_tokenizer(vocab_size=300)
    with pytest.raises(TokenizerMismatchError):
        make_separate_amateur(tiny_llama, tiny_tokenizer, testing.tiny_llama(seed=1), other_tokenizer)


def test_method_needs_an_amateur_from_the_same_expert(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="needs an amateur"):
        ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer)
    with pytest.raises(ValueError, match="different model"):
        ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer, amateur=EarlyExitAmateur(testing.tiny_llama(seed=5), 2))


# ---------------------------------------------------------------------------------------------- registry
def test_registry_method_runs_through_the_shared_runner(tiny_llama, amateur, tiny_tokenizer):
    assert get_method("cd") is ContrastiveDecodingMethod
    wrapped = SeparateAmateur(amateur, tiny_tokenizer, "seed1", vocab_size=384)
    method = ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer, amateur=wrapped, cd_formulation="li", alpha=0.1)
    results, stats = run_generate(tiny_llama, tiny_tokenizer, PROMPTS, method, max_new_tokens=12, batch_size=2)
    hp = dict(formulation="li", alpha=0.1, beta=0.5, tau=1.0)
    for prompt, result in zip(PROMPTS, results):
        reference = naive_cd_greedy(tiny_llama, amateur, _prompt_ids(tiny_tokenizer, prompt), 12, **hp)
        assert result.token_ids == [t for t in reference if t != EOS]
    assert stats.new_tokens > 0
    assert method.describe()["amateur"] == "seed1" and method.describe()["cd_formulation"] == "li"


def test_registry_method_with_early_exit_amateur(tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    early = EarlyExitAmateur(expert, 2)
    method = ContrastiveDecodingMethod(expert, tiny_tokenizer, amateur=early, num_beams=2)
    kwargs = method.generate_kwargs(_batch(tiny_tokenizer))
    assert kwargs["num_beams"] == 2 and isinstance(kwargs["logits_processor"][0], EarlyExitContrastiveLogitsProcessor)
    results, _ = run_generate(expert, tiny_tokenizer, PROMPTS, method, max_new_tokens=6)
    assert len(results) == len(PROMPTS)
    del kwargs
    gc.collect()
    assert _hook_count(early) == 0


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
@pytest.mark.parametrize("formulation", ["obrien-lewis", "li"])
def test_smollm2_matches_naive_reference(smollm2, formulation):
    """Real SmolLM2 with its 8-layer early exit as a separate cached amateur and as the hook form."""
    model, tokenizer = smollm2.model, smollm2.tokenizer
    early = EarlyExitAmateur(model, 8)
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    hp = dict(formulation=formulation, alpha=0.1, beta=0.5, tau=1.0)
    eos = model.generation_config.eos_token_id
    separate = ContrastiveDecodingLogitsProcessor(
        early.model, formulation=formulation, attention_mask=batch["attention_mask"]
    )
    got = model.generate(**batch, max_new_tokens=10, do_sample=False, logits_processor=LogitsProcessorList([separate]))
    with EarlyExitContrastiveLogitsProcessor(early, formulation=formulation) as hooked:
        got_hooked = model.generate(
            **batch, max_new_tokens=10, do_sample=False, logits_processor=LogitsProcessorList([hooked])
        )
    assert torch.equal(got, got_hooked)
    for prompt, row in zip(prompts, got[:, batch["input_ids"].shape[1] :].tolist()):
        ids = tokenizer(prompt)["input_ids"]
        reference = []
        for _ in range(10):
            token = int(naive_cd_scores(_last_logits(model, ids), _last_logits(early.model, ids), **hp).argmax())
            ids.append(token)
            reference.append(token)
            if token == eos:
                break
        assert row[: len(reference)] == reference


@pytest.mark.parametrize("formulation", ["obrien-lewis", "li"])
def test_early_exit_head_on_plausible_tokens_only_gives_the_same_distribution(formulation):
    """The early-exit path evaluates the amateur head only on plausible tokens when the scores are
    raw logits; the resulting next-token distribution must equal the full-head computation."""
    from cdlm.decoding.contrast import contrast

    expert = testing.tiny_llama(seed=4)
    amateur = EarlyExitAmateur(expert, 2)
    processor = EarlyExitContrastiveLogitsProcessor(amateur, alpha=0.05, beta=0.7, formulation=formulation)
    torch.manual_seed(1)
    hidden = torch.randn(3, expert.config.hidden_size)
    logits = torch.randn(3, expert.config.vocab_size) * 3
    weight = 1.0 if formulation == "li" else 0.7
    exact = contrast(logits, amateur.logits_from_hidden(hidden), alpha=0.05, weight=weight, formulation=formulation)
    fast = processor._contrast(logits, processor._amateur_logits(hidden, logits), processor.vocab_size)
    assert torch.equal(torch.isinf(exact), torch.isinf(fast))
    assert torch.allclose(exact.softmax(-1), fast.softmax(-1), atol=1e-6)
    # Beam search passes log-probabilities: there the per-row normaliser matters, so the full head is used.
    log_probs = logits.log_softmax(-1)
    assert torch.equal(processor._amateur_logits(hidden, log_probs), amateur.logits_from_hidden(hidden))
    processor.close()
