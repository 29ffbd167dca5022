"""DoLa: exactness against a naive implementation written from the paper, against transformers 4.55.4's
recorded outputs (real model), hand-computed values, and its generate()/registry contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import cdlm.decoding.dola as dola_module
from cdlm import testing
from cdlm.decoding.dola import candidate_layers, dola, dola_contrast, dola_generate
from cdlm.decoding.methods import DolaMethod, get_method
from cdlm.decoding.runner import generate as run_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "dola_reference.json"
PROMPTS = ["The quick brown fox", "A man is sitting on a roof. He", "0 1 2 3 4 5 6 7"]


def _softcapped(model, logits):
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def naive_dola(model, prompt_ids, layers, *, form, relative_top, penalty, max_new_tokens, eos_id):
    """DoLa for one sequence as the paper states it, the slow way and in float64: every step re-runs the
    model on the whole sequence (no cache), reads each candidate layer's distribution, picks the layer
    with the largest divergence from the final layer, keeps the tokens whose final probability is at
    least ``relative_top`` times the largest, scores them by the log-ratio, applies Keskar et al.'s
    repetition penalty to every token already in the sequence, and takes the argmax. Returns the new tokens and
    the layer contrasted at each step.

    ``form="paper"``: premature layers are read like the final one (final norm, head, soft-capping) and the
    divergence is Jensen-Shannon. ``form="transformers"``: 4.55.4's bare head on the raw hidden state, and
    its divergence 0.5 * (KL(m || p_final) + KL(m || p_j)) / vocabulary size.
    """
    sequence, chosen = list(prompt_ids), []
    norm = model.get_decoder().norm
    for _ in range(max_new_tokens):
        out = model(input_ids=torch.tensor([sequence]), output_hidden_states=True)
        final = out.logits[0, -1].double().softmax(-1)
        best_layer, best_divergence = None, -math.inf
        for layer in layers:
            hidden = out.hidden_states[layer][0, -1]
            logits = _softcapped(model, model.lm_head(norm(hidden))) if form == "paper" else model.lm_head(hidden)
            premature = logits.double().softmax(-1)
            middle = (final + premature) / 2
            if form == "paper":
                divergence = 0.5 * (
                    (final * (final / middle).log()).nansum() + (premature * (premature / middle).log()).nansum()
                )
            else:
                divergence = 0.5 * (
                    (middle * (middle / final).log()).sum() + (middle * (middle / premature).log()).sum()
                )
                divergence = divergence / final.numel()
            if divergence > best_divergence:
                best_layer, best_divergence, best_premature = layer, divergence, premature
        plausible = final >= relative_top * final.max()
        scores = torch.where(
            plausible, final.log() - best_premature.log(), torch.tensor(-math.inf, dtype=torch.float64)
        )
        for token in set(sequence):
            scores[token] = scores[token] * penalty if scores[token] < 0 else scores[token] / penalty
        token = int(scores.argmax())
        sequence.append(token)
        chosen.append(best_layer)
        if token == eos_id:
            break
    return sequence[len(prompt_ids) :], chosen


def _batch(tokenizer, prompts=PROMPTS):
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


def _softcapped_gemma3():
    model = testing.tiny_gemma3(seed=1)
    model.config.final_logit_softcapping = 5.0  # Gemma-2 style; exercises soft-capping in both forms
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3-softcap"])
@pytest.mark.parametrize("form", ["transformers", "paper"])
@pytest.mark.parametrize(("layers", "penalty"), [((0, 1, 2, 3), 1.0), ((1, 3), 1.2), ((2,), 1.2)])
def test_matches_naive_reference(tiny_tokenizer, family, form, layers, penalty):
    model = testing.tiny_llama(seed=1) if family == "llama" else _softcapped_gemma3()
    for prompt in PROMPTS:
        ids = tiny_tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            expected, expected_layers = naive_dola(
                model,
                ids["input_ids"][0].tolist(),
                layers,
                form=form,
                relative_top=0.1,
                penalty=penalty,
                max_new_tokens=12,
                eos_id=testing.EOS_ID,
            )
        got = model.generate(
            **ids,
            custom_generate=dola,
            dola_layers=list(layers),
            dola_form=form,
            repetition_penalty=penalty,
            max_new_tokens=12,
            return_dict_in_generate=True,
        )
        assert got.sequences[0, ids["input_ids"].shape[1] :].tolist() == expected, prompt
        assert got.premature_layers[0].tolist() == expected_layers, prompt


@pytest.mark.parametrize("penalty", [1.0, 1.2])
@pytest.mark.parametrize("form", ["transformers", "paper"])
def test_batched_equals_unbatched(tiny_tokenizer, tiny_llama, penalty, form):
    """Each row picks its own premature layer, so a row's tokens and layers do not depend on its batch."""
    batch = _batch(tiny_tokenizer)
    kwargs = dict(
        custom_generate=dola, dola_layers=[1, 2, 3], dola_form=form, repetition_penalty=penalty, max_new_tokens=16
    )
    batched = tiny_llama.generate(**batch, **kwargs, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        single = tiny_tokenizer([prompt], return_tensors="pt")
        alone = tiny_llama.generate(**single, **kwargs, return_dict_in_generate=True)
        new_alone = alone.sequences[0, single["input_ids"].shape[1] :].tolist()
        new_batched = batched.sequences[i, width:].tolist()
        assert new_batched[: len(new_alone)] == new_alone
        assert all(t == tiny_tokenizer.pad_token_id for t in new_batched[len(new_alone) :])
        steps = len(new_alone)
        assert batched.premature_layers[i, :steps].tolist() == alone.premature_layers[0].tolist()
    # At some step the rows really chose different layers (what 4.55.4's batch-wide choice cannot do).
    assert bool((batched.premature_layers != batched.premature_layers[:1]).any())


def test_dola_contrast_hand_computed():
    final = torch.tensor([[0.7, 0.2, 0.1]]).log()
    same = final.clone()  # divergence 0: never chosen over a differing layer
    flipped = torch.tensor([[0.1, 0.2, 0.7]]).log()
    premature = torch.stack([same, flipped])
    for form in ("transformers", "paper"):
        scores, chosen = dola_contrast(final, premature, [5, 9], relative_top=0.1, dola_form=form)
        assert chosen.tolist() == [9]
        expected = [math.log(7.0), 0.0, math.log(1 / 7)]
        assert scores[0].tolist() == pytest.approx(expected, abs=1e-5)
    # relative_top 0.2 -> threshold 0.14: the 0.1 token leaves the plausible set.
    scores, _ = dola_contrast(final, premature, [5, 9], relative_top=0.2)
    assert scores[0, 2].item() == -math.inf and scores[0, :2].tolist() == pytest.approx([math.log(7.0), 0.0], abs=1e-5)
    # Jensen-Shannon of these two distributions, by hand: 0.5 * (KL(p||m) + KL(q||m)) with m = (p+q)/2.
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.7])
    m = (p + q) / 2
    by_hand = 0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    js = dola_module._layer_divergence(final, premature, "paper")
    assert js[:, 0].tolist() == pytest.approx([0.0, by_hand.item()], abs=1e-6)


@pytest.mark.parametrize(
    ("num_layers", "tied", "low", "high"),
    [
        (30, True, (2, 4, 6, 8, 10, 12, 14), (15, 17, 19, 21, 23, 25, 27, 29)),  # SmolLM2-135M
        (18, True, (2, 4, 6, 8), (9, 11, 13, 15, 17)),  # Gemma-3-270M
        (4, False, (0,), (2,)),
        (4, True, (2,), (2,)),
        (2, True, (1,), (1,)),
        (1, True, (0,), (0,)),
        (48, True, tuple(range(2, 20, 2)), tuple(range(28, 48, 2))),
    ],
)
def test_candidate_layers_follow_transformers_4_55(num_layers, tied, low, high):
    assert candidate_layers("low", num_layers, tied) == low
    assert candidate_layers("high", num_layers, tied) == high
    assert candidate_layers([3, 1, 3], 30, tied) == (3, 1)
    assert candidate_layers("4, 10,16", 30, tied) == (4, 10, 16)


def test_relative_top_one_is_greedy(tiny_tokenizer, tiny_llama):
    """Only the final layer's argmax survives relative_top=1, so DoLa must then equal greedy."""
    batch = _batch(tiny_tokenizer)
    greedy = tiny_llama.generate(**batch, do_sample=False, max_new_tokens=12)
    got = tiny_llama.generate(**batch, custom_generate=dola, dola_layers=[0, 2], relative_top=1.0, max_new_tokens=12)
    assert got.tolist() == greedy.tolist()


def test_differs_from_greedy(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    greedy = tiny_llama.generate(**batch, do_sample=False, max_new_tokens=12)
    got = tiny_llama.generate(**batch, custom_generate=dola, dola_layers=[0, 2], max_new_tokens=12)
    assert got.tolist() != greedy.tolist()


def test_sampling_with_top_k_one_equals_greedy_dola(tiny_tokenizer, tiny_llama):
    """do_sample samples from the processed DoLa scores: with top_k=1 only their argmax is left."""
    batch = _batch(tiny_tokenizer)
    kwargs = dict(custom_generate=dola, dola_layers="low", repetition_penalty=1.2, max_new_tokens=12)
    assert (
        tiny_llama.generate(**batch, **kwargs, do_sample=True, top_k=1).tolist()
        == tiny_llama.generate(**batch, **kwargs).tolist()
    )


def test_module_is_callable_and_return_dict(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    plain = tiny_llama.generate(**batch, custom_generate=dola, dola_layers=[1, 3], max_new_tokens=8, min_new_tokens=8)
    out = tiny_llama.generate(
        **batch,
        custom_generate=dola_module,
        dola_layers=[1, 3],
        max_new_tokens=8,
        min_new_tokens=8,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert out.sequences.tolist() == plain.tolist()
    assert len(out.scores) == len(out.logits) == 8
    assert out.premature_layers.shape == (len(PROMPTS), 8) and set(out.premature_layers.flatten().tolist()) <= {1, 3}
    # Chosen tokens are the argmax of the DoLa scores, and tokens outside the plausible set are -inf.
    first = out.sequences[:, batch["input_ids"].shape[1]]
    assert first.tolist() == out.scores[0].argmax(-1).tolist()
    assert bool(torch.isinf(out.scores[0]).any())
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


def test_plain_function_api_and_method(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    via_generate = tiny_llama.generate(
        **batch, custom_generate=dola, dola_layers="high", repetition_penalty=1.2, max_new_tokens=10
    )
    plain = dola_generate(tiny_llama, batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    assert plain.tolist() == via_generate.tolist()  # defaults: "high", relative_top 0.1, penalty 1.2
    method = get_method("dola")(tiny_llama, tiny_tokenizer, dola_layers="0,2")
    assert isinstance(method, DolaMethod)
    assert method.describe() == {
        "method": "dola",
        "dola_layers": "0,2",
        "relative_top": 0.1,
        "dola_form": "transformers",
        "repetition_penalty": 1.2,
    }
    generations, stats = run_generate(tiny_llama, tiny_tokenizer, PROMPTS[:2], method, max_new_tokens=8)
    direct = tiny_llama.generate(
        **_batch(tiny_tokenizer, PROMPTS[:2]),
        custom_generate=dola,
        dola_layers=[0, 2],
        repetition_penalty=1.2,
        max_new_tokens=8,
    )
    width = _batch(tiny_tokenizer, PROMPTS[:2])["input_ids"].shape[1]
    first = [t for t in direct[0, width:].tolist() if t not in (testing.PAD_ID, testing.EOS_ID)]
    assert generations[0].token_ids == first[: len(generations[0].token_ids)]
    assert stats.new_tokens > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dola_layers="middle"), "dola_layers"),
        (dict(dola_layers=[]), "dola_layers"),
        (dict(dola_layers=[4]), r"out of range.*0 \(embeddings\) \.\. 3"),
        (dict(dola_layers=[-1]), "out of range"),
        (dict(dola_layers=[1.5]), "integer"),
        (dict(relative_top=0.0), "relative_top"),
        (dict(relative_top=1.5), "relative_top"),
        (dict(dola_form="original"), "dola_form"),
        (dict(num_beams=2), "beam"),
    ],
)
def test_bad_input_raises(tiny_tokenizer, tiny_llama, kwargs, message):
    batch = _batch(tiny_tokenizer)
    with pytest.raises(ValueError, match=message):
        tiny_llama.generate(**batch, custom_generate=dola, max_new_tokens=4, **kwargs)


def test_bad_input_raises_in_function_and_method(tiny_tokenizer, tiny_llama):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="relative_top"):
        dola_generate(tiny_llama, ids, relative_top=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        dola_generate(tiny_llama, ids, repetition_penalty=0)
    with pytest.raises(ValueError, match="out of range"):
        DolaMethod(tiny_llama, tiny_tokenizer, dola_layers="2,9")
    with pytest.raises(ValueError, match="dola_form"):
        DolaMethod(tiny_llama, tiny_tokenizer, dola_form="jsd")
    with pytest.raises(ValueError, match="no hyperparameter"):
        DolaMethod(tiny_llama, tiny_tokenizer, alpha=0.1)


def _fixture():
    return json.loads(FIXTURE.read_text())


def test_fixture_covers_the_required_grid():
    fixture = _fixture()
    assert fixture["transformers"] == "4.55.4" and fixture["num_hidden_layers"] == 30
    assert len(fixture["prompts"]) >= 8 and {p["kind"] for p in fixture["prompts"]} == {"plain", "chat"}
    settings = {(str(r["dola_layers"]), r["repetition_penalty"]) for r in fixture["runs"]}
    assert settings == {(str(layers), p) for layers in ("low", "high", [4, 10, 16, 22], [20]) for p in (1.0, 1.2)}
    # The layers 4.55.4 contrasted against are always among the candidates cdlm derives for that setting.
    for run in fixture["runs"]:
        allowed = set(candidate_layers(run["dola_layers"], 30, True))
        assert {layer for steps in run["premature_layers"] for layer in steps} <= allowed


_SETTINGS = [(layers, p) for layers in ("low", "high", [4, 10, 16, 22], [20]) for p in (1.0, 1.2)]
# Two settings run with the real-model tests; the whole grid is `slow`.
_QUICK = {("high", 1.2), (str([4, 10, 16, 22]), 1.0)}


@pytest.mark.parametrize(
    ("dola_layers", "repetition_penalty"),
    [
        pytest.param(
            layers,
            p,
            marks=[pytest.mark.real_model] + ([] if (str(layers), p) in _QUICK else [pytest.mark.slow]),
            id=f"{'-'.join(map(str, layers)) if isinstance(layers, list) else layers}-rp{p}",
        )
        for layers, p in _SETTINGS
    ],
)
def test_matches_transformers_4_55_reference(smollm2, dola_layers, repetition_penalty):
    """Token-identical to transformers 4.55.4's generate(dola_layers=...) on SmolLM2-135M-Instruct (chat and
    plain prompts, batch 1 each, the recorded input ids fed as is), contrasting the same layer at every step."""
    fixture = _fixture()
    run = next(
        r for r in fixture["runs"] if (r["dola_layers"], r["repetition_penalty"]) == (dola_layers, repetition_penalty)
    )
    mismatches = []
    for i, prompt in enumerate(fixture["prompts"]):
        input_ids = torch.tensor([prompt["input_ids"]])
        out = smollm2.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            custom_generate=dola,
            dola_layers=dola_layers,
            repetition_penalty=repetition_penalty,
            max_new_tokens=fixture["max_new_tokens"],
            pad_token_id=fixture["pad_token_id"],
            eos_token_id=fixture["eos_token_id"],
            return_dict_in_generate=True,
        )
        got = out.sequences[0, input_ids.shape[1] :].tolist()
        theirs = run["output_ids"][i]
        if got != theirs:
            first = next((j for j, (a, b) in enumerate(zip(got, theirs)) if a != b), min(len(got), len(theirs)))
            mismatches.append(f"prompt {i} ({prompt['text']!r}): first difference at new token {first}")
        elif out.premature_layers[0].tolist() != run["premature_layers"][i]:
            mismatches.append(f"prompt {i} ({prompt['text']!r}): same tokens, different premature layers")
    assert not mismatches, "\n".join(mismatches)
