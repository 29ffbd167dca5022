"""Contrastive search: exactness against an independent naive implementation, against transformers
4.55.4's recorded outputs (real model), and its generate()/registry contract."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from cdlm import testing
from cdlm.decoding import contrastive_search as cs_module
from cdlm.decoding.contrastive_search import (
    ContrastiveSearchMethod,
    contrastive_search,
    contrastive_search_generate,
)
from cdlm.decoding.methods import get_method
from cdlm.decoding.runner import generate as run_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "contrastive_search_reference.json"
PROMPTS = ["The quick brown fox", "A man is sitting on a roof. He", "0 1 2 3 4 5 6 7"]


def naive_contrastive_search(model, input_ids, attention_mask, alpha, k, max_new_tokens, eos_id, pad_id):
    """The definition, computed the slow way: every candidate re-runs the model on its whole sequence,
    without any cache, and the penalty is the max cosine against every earlier non-padding token."""
    ids = input_ids.clone()
    mask = attention_mask.clone()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)

    def run(seq, seq_mask):
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions, output_hidden_states=True)
        return out.logits[:, -1].float(), out.hidden_states[-1]

    for _ in range(max_new_tokens):
        new_tokens = []
        for b in range(ids.shape[0]):
            seq, seq_mask = ids[b : b + 1], mask[b : b + 1]
            logits, hidden = run(seq, seq_mask)
            probs = F.softmax(logits, dim=-1)[0]
            top_probs, top_ids = probs.topk(k)
            context = hidden[0][seq_mask[0].bool()]  # (L, H), padding excluded
            best, best_score = None, None
            for p, v in zip(top_probs.tolist(), top_ids.tolist()):
                cand = torch.cat([seq, torch.tensor([[v]])], dim=1)
                cand_mask = torch.cat([seq_mask, torch.ones(1, 1, dtype=seq_mask.dtype)], dim=1)
                _, cand_hidden = run(cand, cand_mask)
                penalty = F.cosine_similarity(context, cand_hidden[0, -1:].expand_as(context), dim=-1).max().item()
                score = (1 - alpha) * p - alpha * penalty
                if best_score is None or score > best_score:
                    best, best_score = v, score
            new_tokens.append(pad_id if finished[b] else best)
            if best == eos_id:
                finished[b] = True
        ids = torch.cat([ids, torch.tensor(new_tokens)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], dim=1)
        if finished.all():
            break
    return ids


def _batch(tokenizer, prompts=PROMPTS):
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(("alpha", "k"), [(0.6, 4), (0.3, 3)])
def test_matches_naive_reference(tiny_tokenizer, family, alpha, k):
    model = (testing.tiny_llama(seed=1) if family == "llama" else testing.tiny_gemma3(seed=1)).eval()
    batch = _batch(tiny_tokenizer)
    with torch.no_grad():
        expected = naive_contrastive_search(model, batch["input_ids"], batch["attention_mask"], alpha, k, 14, 2, 0)
    got = model.generate(**batch, custom_generate=contrastive_search, penalty_alpha=alpha, top_k=k, max_new_tokens=14)
    assert got.tolist() == expected.tolist()


def test_batched_equals_unbatched(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    batched = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=5, max_new_tokens=16
    )
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        single = tiny_tokenizer([prompt], return_tensors="pt")
        alone = tiny_llama.generate(
            **single, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=5, max_new_tokens=16
        )
        new_alone = alone[0, single["input_ids"].shape[1] :].tolist()
        new_batched = batched[i, width:].tolist()
        assert new_batched[: len(new_alone)] == new_alone
        assert all(t == tiny_tokenizer.pad_token_id for t in new_batched[len(new_alone) :])


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_alpha_zero_and_top_k_one_are_greedy(tiny_tokenizer, model_name, request):
    model = request.getfixturevalue(model_name)
    batch = _batch(tiny_tokenizer)
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=20)
    alpha_zero = model.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.0, top_k=6, max_new_tokens=20
    )
    top_one = model.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.8, top_k=1, max_new_tokens=20
    )
    assert alpha_zero.tolist() == greedy.tolist()
    assert top_one.tolist() == greedy.tolist()


def test_penalty_changes_output_and_reduces_repetition(tiny_tokenizer, tiny_llama):
    batch = tiny_tokenizer(["A man"], return_tensors="pt")
    greedy = tiny_llama.generate(**batch, do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, 2:].tolist()
    searched = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=24, min_new_tokens=24
    )[0, 2:].tolist()
    assert searched != greedy
    assert len(set(searched)) > len(set(greedy))


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_fast_path_equals_full_model_path(tiny_tokenizer, model_name, request, monkeypatch):
    model = request.getfixturevalue(model_name)
    batch = _batch(tiny_tokenizer)
    kwargs = dict(custom_generate=contrastive_search, penalty_alpha=0.5, top_k=4, max_new_tokens=18)
    fast = model.generate(**batch, **kwargs)

    original = cs_module._Forward.prefill

    def slow_prefill(self, *args):
        result = original(self, *args)
        assert self.fast, "the fast path should be taken for this model"
        self.fast = False
        return result

    monkeypatch.setattr(cs_module._Forward, "prefill", slow_prefill)
    slow = model.generate(**batch, **kwargs)
    assert fast.tolist() == slow.tolist()


def test_hyperparameters_from_generation_config(tiny_tokenizer, tiny_llama):
    from transformers import GenerationConfig

    batch = _batch(tiny_tokenizer)
    direct = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.3, top_k=5, max_new_tokens=8
    )
    config = GenerationConfig(**tiny_llama.generation_config.to_dict())
    config.penalty_alpha, config.top_k, config.max_new_tokens = 0.3, 5, 8
    via_config = tiny_llama.generate(**batch, generation_config=config, custom_generate=contrastive_search)
    defaults = tiny_llama.generate(**batch, custom_generate=contrastive_search, max_new_tokens=8)
    explicit_defaults = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=8
    )
    assert via_config.tolist() == direct.tolist()
    assert defaults.tolist() == explicit_defaults.tolist()


def test_return_dict_scores_and_cache(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    out = tiny_llama.generate(
        **batch,
        custom_generate=contrastive_search,
        penalty_alpha=0.6,
        top_k=4,
        max_new_tokens=10,
        min_new_tokens=10,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_hidden_states=True,
    )
    plain = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=10, min_new_tokens=10
    )
    assert out.sequences.tolist() == plain.tolist()
    assert len(out.scores) == len(out.logits) == 10 == len(out.hidden_states)
    assert out.scores[0].shape == (len(PROMPTS), tiny_llama.config.vocab_size)
    # The first chosen token is among the top-k of the first step's scores.
    first = out.sequences[:, batch["input_ids"].shape[1]]
    assert all(t in row.topk(4).indices for t, row in zip(first, out.scores[0]))
    # The returned cache covers sequences[:, :-1] and has one row per prompt.
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    assert out.past_key_values.layers[0].keys.shape[0] == len(PROMPTS)


def test_eos_and_custom_stopping_criteria_per_row(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    reference = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=12
    )
    width = batch["input_ids"].shape[1]
    stop_token = reference[0, width + 2].item()

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    out = tiny_llama.generate(
        **batch,
        custom_generate=contrastive_search,
        penalty_alpha=0.6,
        top_k=4,
        max_new_tokens=12,
        eos_token_id=stop_token,
        stopping_criteria=StoppingCriteriaList([StopOn()]),
    )
    row = out[0, width:].tolist()
    assert row[:3] == reference[0, width : width + 3].tolist()
    assert all(t == tiny_tokenizer.pad_token_id for t in row[3:])  # row 0 stopped, padded afterwards
    # Rows that never hit the stop token are unaffected by row 0 stopping.
    for i in range(1, len(PROMPTS)):
        ref_row = reference[i, width:].tolist()
        if stop_token not in ref_row:
            assert out[i, width:].tolist()[: len(ref_row)] == ref_row[: out.shape[1] - width]


def test_plain_function_api_and_stop_strings(tiny_tokenizer, tiny_llama):
    batch = _batch(tiny_tokenizer)
    via_generate = tiny_llama.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.4, top_k=3, max_new_tokens=12
    )
    plain = contrastive_search_generate(
        tiny_llama, batch["input_ids"], batch["attention_mask"], penalty_alpha=0.4, top_k=3, max_new_tokens=12
    )
    assert plain.tolist() == via_generate.tolist()
    width = batch["input_ids"].shape[1]
    new_ids = via_generate[0, width:].tolist()
    # A clean word-like token generated after the first one: its text is the stop string.
    position, stop = next(
        (i, tiny_tokenizer.decode([t]).strip())
        for i, t in enumerate(new_ids)
        if i > 0 and tiny_tokenizer.decode([t]).strip().isalpha() and len(tiny_tokenizer.decode([t]).strip()) >= 2
    )
    stopped = contrastive_search_generate(
        tiny_llama,
        batch["input_ids"][:1],
        batch["attention_mask"][:1],
        penalty_alpha=0.4,
        top_k=3,
        max_new_tokens=12,
        stop_strings=[stop],
        tokenizer=tiny_tokenizer,
    )
    stopped_ids = stopped[0, width:].tolist()
    assert stopped_ids == new_ids[: len(stopped_ids)]
    assert len(stopped_ids) <= position + 1
    assert stop in tiny_tokenizer.decode(stopped_ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(penalty_alpha=0.6, top_k=0), "top_k"),
        (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
        (dict(penalty_alpha=-0.1, top_k=4), "penalty_alpha"),
        (dict(penalty_alpha=0.6, top_k=4, do_sample=True), "do_sample"),
    ],
)
def test_bad_hyperparameters_raise(tiny_tokenizer, tiny_llama, kwargs, message):
    batch = _batch(tiny_tokenizer)
    with pytest.raises(ValueError, match=message):
        tiny_llama.generate(**batch, custom_generate=contrastive_search, max_new_tokens=4, **kwargs)


def test_bad_hyperparameters_raise_in_function_and_method(tiny_llama, tiny_tokenizer):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="top_k"):
        contrastive_search_generate(tiny_llama, ids, top_k=0)
    with pytest.raises(ValueError, match="penalty_alpha"):
        contrastive_search_generate(tiny_llama, ids, penalty_alpha=2.0)
    with pytest.raises(ValueError, match="top_k"):
        ContrastiveSearchMethod(tiny_llama, tiny_tokenizer, top_k=0)
    with pytest.raises(ValueError, match="penalty_alpha"):
        ContrastiveSearchMethod(tiny_llama, tiny_tokenizer, penalty_alpha=1.01)


class _NoHiddenStates(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.hidden_states = None
        return out


def test_model_without_hidden_states_raises(tiny_tokenizer):
    source = testing.tiny_llama(seed=0)
    model = _NoHiddenStates(source.config).eval()
    model.load_state_dict(source.state_dict())
    model.generation_config = source.generation_config
    with pytest.raises(ValueError, match="hidden states"):
        model.generate(
            **_batch(tiny_tokenizer), custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=4
        )


def test_registry_method_and_runner(tiny_tokenizer, tiny_llama):
    method_class = get_method("cs")
    assert method_class is ContrastiveSearchMethod
    assert {p.name: (p.type, p.default) for p in method_class.params} == {
        "penalty_alpha": (float, 0.6),
        "top_k": (int, 4),
    }
    method = method_class(tiny_llama, tiny_tokenizer, penalty_alpha=0.5, top_k=3)
    assert method.describe() == {"method": "cs", "penalty_alpha": 0.5, "top_k": 3}
    generations, stats = run_generate(tiny_llama, tiny_tokenizer, PROMPTS, method, max_new_tokens=8, batch_size=2)
    direct = tiny_llama.generate(
        **_batch(tiny_tokenizer, PROMPTS[:2]),
        custom_generate=contrastive_search,
        penalty_alpha=0.5,
        top_k=3,
        max_new_tokens=8,
    )
    width = _batch(tiny_tokenizer, PROMPTS[:2])["input_ids"].shape[1]
    first = [t for t in direct[0, width:].tolist() if t not in (0, 2)]
    assert generations[0].token_ids == first[: len(generations[0].token_ids)]
    assert stats.new_tokens == sum(len(g.token_ids) for g in generations) > 0


# Prompts several times longer than tiny_gemma3's sliding window (8), of different lengths (left padding).
LONG_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "A man is sitting on a roof. He",
    "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell? Answer:",
]
LAYOUTS = ["shared_context", "row_per_candidate"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layouts_match_naive_reference_with_long_prompts(tiny_tokenizer, family, layout):
    model = (testing.tiny_llama(seed=2) if family == "llama" else testing.tiny_gemma3(seed=2)).eval()
    batch = _batch(tiny_tokenizer, LONG_PROMPTS)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert min(lengths) > 8 and max(lengths) > 3 * 8 and len(set(lengths)) == len(lengths)
    with torch.no_grad():
        expected = naive_contrastive_search(model, batch["input_ids"], batch["attention_mask"], 0.6, 4, 12, 2, 0)
    got = model.generate(
        **batch,
        custom_generate=contrastive_search,
        penalty_alpha=0.6,
        top_k=4,
        max_new_tokens=12,
        candidate_layout=layout,
    )
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_shared_context_batched_equals_unbatched_and_per_row_eos(tiny_tokenizer, model_name, request):
    model = request.getfixturevalue(model_name)
    batch = _batch(tiny_tokenizer, LONG_PROMPTS)
    kwargs = dict(custom_generate=contrastive_search, penalty_alpha=0.6, top_k=3, max_new_tokens=20)
    free = model.generate(**batch, **kwargs, candidate_layout="row_per_candidate")
    width = batch["input_ids"].shape[1]
    stop_token = free[1, width + 4].item()  # row 1 stops early; the others may or may not meet it
    batched = model.generate(**batch, **kwargs, eos_token_id=stop_token, candidate_layout="shared_context")
    per_row = model.generate(**batch, **kwargs, eos_token_id=stop_token, candidate_layout="row_per_candidate")
    assert batched.tolist() == per_row.tolist()
    assert batched[1, width + 5 :].eq(tiny_tokenizer.pad_token_id).all()
    for i, prompt in enumerate(LONG_PROMPTS):
        single = tiny_tokenizer([prompt], return_tensors="pt")
        alone = model.generate(**single, **kwargs, eos_token_id=stop_token, candidate_layout="shared_context")
        new_alone = alone[0, single["input_ids"].shape[1] :].tolist()
        new_batched = batched[i, width:].tolist()
        assert new_batched[: len(new_alone)] == new_alone
        assert all(t == tiny_tokenizer.pad_token_id for t in new_batched[len(new_alone) :])


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_shared_context_cache_holds_only_the_winners(tiny_tokenizer, model_name, request):
    """The returned cache equals a fresh prefill of the chosen sequence: no candidate entry survives, and
    sliding-window layers hold exactly their last ``window - 1`` positions."""
    model = request.getfixturevalue(model_name)
    batch = _batch(tiny_tokenizer, LONG_PROMPTS)
    out = model.generate(
        **batch,
        custom_generate=contrastive_search,
        penalty_alpha=0.6,
        top_k=4,
        max_new_tokens=10,
        min_new_tokens=10,
        return_dict_in_generate=True,
        candidate_layout="shared_context",
    )
    cache = out.past_key_values
    covered = cache.get_seq_length()  # sequences[:, :-1], or all of it where a full sliding window can't be cropped
    assert covered in (out.sequences.shape[1] - 1, out.sequences.shape[1])
    ids = out.sequences[:, :covered]
    generated = torch.ones(ids.shape[0], covered - batch["attention_mask"].shape[1], dtype=torch.long)
    mask = torch.cat([batch["attention_mask"], generated], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate()'s convention, padding included
    fresh = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
    for layer, expected in zip(cache.layers, fresh.layers):
        assert layer.keys.shape == expected.keys.shape
        # Padding positions hold whatever a fully masked query computes (it depends on the sequence length).
        real = mask[:, -layer.keys.shape[-2] :].bool()[:, None, :, None].expand_as(layer.keys)
        assert real.any()
        torch.testing.assert_close(layer.keys[real], expected.keys[real], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values[real], expected.values[real], rtol=1e-4, atol=1e-5)
        assert not getattr(layer, "record_past", False)
    if model_name == "tiny_gemma3":
        window = model.config.sliding_window
        assert {layer.keys.shape[-2] for layer in cache.layers if layer.is_sliding} == {window - 1}


def test_candidate_mask_exact_values():
    """Candidate j sees the row's non-padding past and itself, never a sibling candidate."""
    low = torch.finfo(torch.float32).min
    padding = torch.tensor([[low, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    path = cs_module._SharedContext.__new__(cs_module._SharedContext)
    path.k, path.padding = 2, padding
    path.own_entry = torch.tensor([[0.0, low], [low, 0.0]])
    mask = path._mask(stored=2, length=3)  # the last 2 of 3 context positions (a sliding window), then 2 candidates
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].tolist() == [[0.0, 0.0, 0.0, low], [0.0, 0.0, low, 0.0]]
    full = path._mask(stored=3, length=3)
    assert full[0, 0].tolist() == [[low, 0.0, 0.0, 0.0, low], [low, 0.0, 0.0, low, 0.0]]
    assert full[1, 0].tolist() == [[0.0, 0.0, 0.0, 0.0, low], [0.0, 0.0, 0.0, low, 0.0]]


def test_layout_of_tiny_models(tiny_llama, tiny_gemma3):
    from transformers import DynamicCache

    def layout(model):
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
        return cs_module._shared_context_layout(model, cache)

    assert layout(tiny_llama) == ([False] * 4, None)
    assert layout(tiny_gemma3) == ([True, False, True, False], {"sliding_attention": True, "full_attention": False})


def _choices(monkeypatch):
    chosen = []
    original = cs_module._candidate_path

    def spy(*args, **kwargs):
        path = original(*args, **kwargs)
        chosen.append(path.name)
        return path

    monkeypatch.setattr(cs_module, "_candidate_path", spy)
    return chosen


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_auto_layout_checks_then_shares_the_context(tiny_tokenizer, model_name, request, monkeypatch):
    model = request.getfixturevalue(model_name)
    monkeypatch.setattr(cs_module, "_SHARED_CONTEXT_CHECKED", weakref.WeakKeyDictionary())
    checks = []
    original_init = cs_module._RowPerCandidate.__init__

    def counting_init(self, *args, **kwargs):
        checks.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(cs_module._RowPerCandidate, "__init__", counting_init)
    batch = _batch(tiny_tokenizer, LONG_PROMPTS)
    chosen = _choices(monkeypatch)
    kwargs = dict(custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=12)
    auto = model.generate(**batch, **kwargs)
    assert chosen == ["shared_context"] and len(checks) == 1  # checked against one row per candidate, once
    assert model.generate(**batch, **kwargs).tolist() == auto.tolist() and len(checks) == 1  # not re-checked
    checks.clear()
    assert auto.tolist() == model.generate(**batch, **kwargs, candidate_layout="row_per_candidate").tolist()
    assert chosen == ["shared_context"] * 2 + ["row_per_candidate"]
    # A cache too small for the shared context to pay (1 row x 5 tokens) keeps one row per candidate.
    built = len(checks)
    model.generate(**tiny_tokenizer(["The quick brown fox"], return_tensors="pt"), **kwargs)
    assert chosen[-1] == "row_per_candidate" and len(checks) == built + 1  # the path itself, no check


def test_auto_layout_falls_back_when_the_check_fails(tiny_tokenizer, tiny_llama, monkeypatch, caplog):
    """A mask that lets candidates see each other (a model mishandling the 4-D mask would look like this)
    changes the tokens when forced, and ``auto`` notices on the first step and runs one row per candidate."""
    monkeypatch.setattr(cs_module, "_SHARED_CONTEXT_CHECKED", weakref.WeakKeyDictionary())  # forget earlier checks
    batch = _batch(tiny_tokenizer, LONG_PROMPTS)
    kwargs = dict(custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=12)
    per_row = tiny_llama.generate(**batch, **kwargs, candidate_layout="row_per_candidate")

    def leaky_mask(self, stored, length):
        mask = original_mask(self, stored, length)
        mask[..., stored:] = 0.0
        return mask

    original_mask = cs_module._SharedContext._mask
    monkeypatch.setattr(cs_module._SharedContext, "_mask", leaky_mask)
    assert tiny_llama.generate(**batch, **kwargs, candidate_layout="shared_context").tolist() != per_row.tolist()
    chosen = _choices(monkeypatch)
    with caplog.at_level("WARNING", logger=cs_module.__name__):
        auto = tiny_llama.generate(**batch, **kwargs)
    assert chosen == ["row_per_candidate"]
    assert "changed" in caplog.text
    assert auto.tolist() == per_row.tolist()


def test_bad_candidate_layout_raises(tiny_tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="candidate_layout"):
        tiny_llama.generate(
            **_batch(tiny_tokenizer), custom_generate=contrastive_search, max_new_tokens=2, candidate_layout="tree"
        )


def _fixture():
    return json.loads(FIXTURE.read_text())


def test_fixture_covers_the_required_grid():
    fixture = _fixture()
    assert fixture["transformers"] == "4.55.4"
    assert len(fixture["prompts"]) >= 10 and {p["kind"] for p in fixture["prompts"]} == {"plain", "chat"}
    settings = {(r["penalty_alpha"], r["top_k"]) for r in fixture["runs"]}
    assert settings == {(0.4, 4), (0.6, 4), (0.4, 8), (0.6, 8)}
    assert all(len(row) == fixture["max_new_tokens"] == 64 for r in fixture["runs"] for row in r["output_ids"])


# One setting runs with the real-model tests (about a minute on a quiet 2-core CPU); the whole grid
# is `slow` (several minutes: 12 prompts x k=8 is a 96-query forward per token), as is the 4.55.4-style
# row-per-candidate layout (the default `auto` takes the shared-context layout on this model).
_RUN_MARKS = {(0.6, 4, "auto"): [pytest.mark.real_model]}


@pytest.mark.parametrize(
    ("penalty_alpha", "top_k", "layout"),
    [
        pytest.param(
            a,
            k,
            layout,
            marks=_RUN_MARKS.get((a, k, layout), [pytest.mark.real_model, pytest.mark.slow]),
            id=f"alpha{a}-k{k}-{layout}",
        )
        for layout in ("auto", "row_per_candidate")
        for a, k in [(0.6, 4), (0.4, 4), (0.4, 8), (0.6, 8)]
    ],
)
def test_matches_transformers_4_55_reference(smollm2, penalty_alpha, top_k, layout, monkeypatch):
    """Token-identical to transformers 4.55.4's built-in contrastive search on SmolLM2-135M-Instruct
    (12 chat and plain prompts, 64 new tokens, the recorded left-padded batch fed as exact ids)."""
    chosen = _choices(monkeypatch)
    fixture = _fixture()
    run = next(r for r in fixture["runs"] if (r["penalty_alpha"], r["top_k"]) == (penalty_alpha, top_k))
    input_ids = torch.tensor(fixture["batch"]["input_ids"])
    attention_mask = torch.tensor(fixture["batch"]["attention_mask"])
    out = smollm2.model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        custom_generate=contrastive_search,
        penalty_alpha=penalty_alpha,
        top_k=top_k,
        max_new_tokens=fixture["max_new_tokens"],
        pad_token_id=fixture["pad_token_id"],
        eos_token_id=fixture["eos_token_id"],
        candidate_layout=layout,
    )
    assert chosen == ["shared_context" if layout == "auto" else layout]
    got = out[:, input_ids.shape[1] :].tolist()
    mismatches = []
    for i, (mine, theirs) in enumerate(zip(got, run["output_ids"])):
        if mine != theirs:
            first = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            mismatches.append(f"prompt {i} ({fixture['prompts'][i]['text']!r}): first difference at new token {first}")
    assert not mismatches, "\n".join(mismatches)


def test_runner_with_stop_strings(tiny_tokenizer, tiny_llama):
    method = ContrastiveSearchMethod(tiny_llama, tiny_tokenizer)
    plain, _ = run_generate(tiny_llama, tiny_tokenizer, PROMPTS[:1], method, max_new_tokens=12)
    text = plain[0].text
    stop = text[2:4]
    stopped, _ = run_generate(tiny_llama, tiny_tokenizer, PROMPTS[:1], method, max_new_tokens=12, stop=[stop])
    assert stop not in stopped[0].text and text.startswith(stopped[0].text)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma3_batched_and_greedy_limit(gemma3):
    model, tokenizer = gemma3.model, gemma3.tokenizer
    prompts = ["The three primary colours are", "def add(a, b):"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(custom_generate=contrastive_search, penalty_alpha=0.6, top_k=4, max_new_tokens=16)
    batched = model.generate(**batch, **kwargs)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(prompts):
        single = tokenizer([prompt], return_tensors="pt")
        alone = model.generate(**single, **kwargs)[0, single["input_ids"].shape[1] :].tolist()
        assert batched[i, width : width + len(alone)].tolist() == alone
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=16)
    alpha_zero = model.generate(
        **batch, custom_generate=contrastive_search, penalty_alpha=0.0, top_k=4, max_new_tokens=16
    )
    assert alpha_zero.tolist() == greedy.tolist()
