"""cdlm.decoding.vllm without vLLM: settings parsing, batch bookkeeping and a fake engine loop.

The fake engine drives ``ContrastiveProcessorCore`` the way vLLM's v1 sampler does (a persistent
batch with requests added into freed slots, condensed by moves, swapped; ``update_state`` then
``apply`` every step on a (slots, vocab) logits tensor; output lists appended in place), and its
greedy tokens are checked against cdlm's transformers processors (``generate()`` per prompt).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import pytest
import torch
from transformers import LogitsProcessorList

from cdlm import testing
from cdlm.decoding.contrastive_decoding import ContrastiveDecodingLogitsProcessor
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.decoding.vllm.amateurs import clear_amateurs, get_amateur, register_amateur
from cdlm.decoding.vllm.core import ContrastiveProcessorCore
from cdlm.decoding.vllm.params import EXTRA_ARGS_KEY, ContrastParams
from cdlm.decoding.vllm.state import HFAmateur, RequestState, RequestTable
from cdlm.models.amateur import EarlyExitAmateur

EOS = 2


# ---------------------------------------------------------------- settings
def test_params_round_trip_through_json_and_defaults_match_transformers_methods():
    from cdlm.decoding.contrastive_decoding import ContrastiveDecodingMethod
    from cdlm.decoding.contrastive_input import ContrastiveInputMethod

    cd = ContrastParams(method="cd", amateur="early-exit:8", beta=0.8, cd_formulation="li")
    extra = json.loads(json.dumps(cd.to_extra_args()))  # what survives vLLM's IPC / the HTTP API
    assert ContrastParams.from_extra_args(extra) == cd
    cid = ContrastParams(method="cid", contrastive_prompt_token_ids=[5, 6, 7])
    assert ContrastParams.from_extra_args(json.loads(json.dumps(cid.to_extra_args()))) == cid
    assert cid.amateur == "self" and cid.contrastive_prompt_token_ids == (5, 6, 7)
    defaults = ContrastParams(method="cd", amateur="x")
    for method_class in (ContrastiveDecodingMethod, ContrastiveInputMethod):
        for param in method_class.params:
            if hasattr(defaults, param.name):
                assert getattr(defaults, param.name) == param.default, param.name


def test_non_contrastive_requests_parse_to_none():
    assert ContrastParams.from_extra_args(None) is None
    assert ContrastParams.from_extra_args({}) is None
    assert ContrastParams.from_extra_args({"other_plugin": 1}) is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "cs"}, "method must be one of"),
        ({"method": "cd"}, "needs an amateur"),
        ({"method": "cd", "amateur": "a", "alpha": 0.0}, "alpha"),
        ({"method": "cd", "amateur": "a", "alpha": 1.5}, "alpha"),
        ({"method": "cd", "amateur": "a", "beta": -1.0}, "beta"),
        ({"method": "cd", "amateur": "a", "amateur_temperature": 0}, "amateur_temperature"),
        ({"method": "cd", "amateur": "a", "alpha": float("nan")}, "finite"),
        ({"method": "cd", "amateur": "a", "cd_formulation": "obrien"}, "cd_formulation"),
        ({"method": "cd", "amateur": "a", "contrastive_prompt_token_ids": [1]}, "only used by method 'cid'"),
        ({"method": "cid"}, "needs contrastive_prompt_token_ids"),
        ({"method": "cid", "contrastive_prompt_token_ids": [1, -3]}, "non-negative"),
        ({"method": "cid", "contrastive_prompt_token_ids": [1], "amateur": "other"}, "contrasts the expert with itself"),
        ({"method": "cid", "contrastive_prompt_token_ids": [1], "cid_lambda": -0.1}, "cid_lambda"),
        ({"method": "cd", "amateur": "a", "lambda": 1}, "unknown cdlm contrastive setting"),
    ],
)
def test_bad_settings_raise_value_errors_naming_the_problem(settings, message):
    with pytest.raises(ValueError, match=message):
        ContrastParams.from_extra_args({EXTRA_ARGS_KEY: settings})


def test_settings_must_be_a_dict():
    with pytest.raises(ValueError, match="must be a dict"):
        ContrastParams.from_extra_args({EXTRA_ARGS_KEY: "cd"})


def test_contrast_kwargs_mirror_the_transformers_processors():
    assert ContrastParams(method="cd", amateur="a", beta=0.3).contrast_kwargs() == {
        "alpha": 0.1, "weight": 0.3, "formulation": "obrien-lewis", "other_temperature": 1.0
    }
    assert ContrastParams(method="cd", amateur="a", cd_formulation="li", amateur_temperature=2.0).contrast_kwargs()["weight"] == 1.0
    cid = ContrastParams(method="cid", contrastive_prompt_token_ids=[1], cid_lambda=0.7).contrast_kwargs()
    assert cid == {"alpha": 0.1, "weight": 0.7, "formulation": "li", "other_temperature": 1.0}


# ---------------------------------------------------------------- bookkeeping
class _CountingAmateur:
    def __init__(self):
        self.fed: list[list[int]] = []

    def advance(self, state: RequestState) -> torch.Tensor:
        pending = state.pending_ids()
        if pending:
            self.fed.append(pending)
            state.fed += len(pending)
            state.last_logits = torch.tensor([float(state.fed)])
        return state.last_logits


def test_state_feeds_only_unseen_tokens_and_tolerates_steps_without_new_tokens():
    amateur = _CountingAmateur()
    output: list[int] = []
    state = RequestState(ContrastParams(method="cd", amateur="a"), [1, 2, 3], output, amateur)
    state.amateur_logits()
    state.amateur_logits()  # a chunked-prefill step: no new token, nothing fed
    output.append(7)
    state.amateur_logits()
    output.extend([8, 9])  # two tokens arrived at once (e.g. a skipped step)
    state.amateur_logits()
    assert amateur.fed == [[1, 2, 3], [7], [8, 9]]
    del output[:]  # the context shrank (never expected): start over rather than use a stale cache
    state.amateur_logits()
    assert amateur.fed[-1] == [1, 2, 3]


def test_preempted_request_readded_with_output_feeds_prompt_and_output():
    amateur = _CountingAmateur()
    state = RequestState(ContrastParams(method="cd", amateur="a"), [1, 2], [5, 6], amateur)
    state.amateur_logits()
    assert amateur.fed == [[1, 2, 5, 6]]


def test_placeholder_ids_from_async_scheduling_are_rejected():
    state = RequestState(ContrastParams(method="cd", amateur="a"), [1], [-1], _CountingAmateur())
    with pytest.raises(RuntimeError, match="async scheduling"):
        state.amateur_logits()


def test_request_table_applies_removed_added_moved_in_order():
    table = RequestTable()
    make = lambda params, prompt, output: None if params is None else params  # noqa: E731
    table.update([], [(0, "a", [1], []), (1, "b", [1], []), (2, None, [1], []), (3, "d", [1], [])], [], make)
    assert dict(table.items()) == {0: "a", 1: "b", 3: "d"}
    # b finishes; e takes slot 1; d is condensed from 3 into 2 (one-way); then 0 and 1 swap.
    table.update([1], [], [], make)
    table.update([], [(1, "e", [1], [])], [(3, 2, "UNIDIRECTIONAL"), (0, 1, "SWAP")], make)
    assert dict(table.items()) == {0: "e", 1: "a", 2: "d"}
    # an added non-contrastive request replaces a contrastive one at the same index
    table.update([], [(2, None, [1], [])], [], make)
    assert dict(table.items()) == {0: "e", 1: "a"}


# ---------------------------------------------------------------- fake engine vs transformers
@dataclass
class _Params:
    extra_args: dict | None


class _FakeEngine:
    """vLLM's v1 persistent-batch protocol, with the expert run by transformers (full recompute)."""

    def __init__(self, core: ContrastiveProcessorCore, expert, max_tokens: int, max_slots: int, swap_at: int = 2):
        self.core, self.expert, self.max_tokens, self.max_slots, self.swap_at = core, expert, max_tokens, max_slots, swap_at

    def run(self, requests: list[tuple[list[int], dict | None]]) -> list[list[int]]:
        waiting = deque(range(len(requests)))
        outputs = [[] for _ in requests]
        slots: list[int | None] = []
        removed: list[int] = []
        step = 0
        while waiting or any(s is not None for s in slots):
            added, moved = [], []
            while waiting and sum(s is not None for s in slots) < self.max_slots:
                rid = waiting.popleft()
                if removed:
                    index = min(removed)
                    removed.remove(index)
                else:
                    index = len(slots)
                    slots.append(None)
                slots[index] = rid
                prompt, extra = requests[rid]
                added.append((index, _Params(extra), list(prompt), outputs[rid]))
            for hole in sorted(removed):  # condense: move the last request into each hole
                last = max(i for i, s in enumerate(slots) if s is not None)
                if last > hole:
                    slots[hole], slots[last] = slots[last], None
                    moved.append((last, hole, "UNIDIRECTIONAL"))
            while slots and slots[-1] is None:
                slots.pop()
            if step == self.swap_at and len(slots) >= 2:
                slots[0], slots[1] = slots[1], slots[0]
                moved.append((0, 1, "SWAP"))
            self.core.update(removed, added, moved)
            removed = []
            with torch.inference_mode():
                logits = torch.stack(
                    [self.expert(torch.tensor([requests[rid][0] + outputs[rid]])).logits[0, -1].float() for rid in slots]
                )
                logits = self.core.apply(logits)  # vLLM's sampler also runs under inference mode
            for index, rid in enumerate(slots):
                token = int(logits[index].argmax())
                outputs[rid].append(token)
                if token == EOS or len(outputs[rid]) >= self.max_tokens:
                    slots[index] = None
                    removed.append(index)
            step += 1
        self.core.update(removed, [], [])  # the batch update vLLM sends before its next step
        return outputs


def _reference(expert, prompt: list[int], processor, max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = {"logits_processor": LogitsProcessorList([processor])} if processor is not None else {}
    with torch.inference_mode():
        out = expert.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=EOS, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def _trim(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_fake_engine_matches_transformers_processors_with_mixed_requests(tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    amateur_model = testing.tiny_llama(seed=1)
    resolve = lambda spec, source, device, dtype: HFAmateur(expert if spec == "self" else amateur_model)  # noqa: E731
    core = ContrastiveProcessorCore("unused", resolve_amateur=resolve)
    texts = ["The quick brown fox", "Once upon a time", "Hello", "Numbers: 1 2 3", "A cat sat", "Why is the sky"]
    prompts = [tiny_tokenizer(t)["input_ids"] for t in texts]
    contrastive = tiny_tokenizer("Generic text")["input_ids"]
    settings = [
        ContrastParams(method="cd", amateur="tiny", beta=0.5),
        None,  # a plain greedy request sharing the batch
        ContrastParams(method="cid", contrastive_prompt_token_ids=contrastive, cid_lambda=0.8),
        ContrastParams(method="cd", amateur="tiny", cd_formulation="li", alpha=0.05, amateur_temperature=0.7),
        ContrastParams(method="cd", amateur="tiny", beta=1.0),
        ContrastParams(method="cid", contrastive_prompt_token_ids=contrastive, cid_lambda=0.0),
    ]
    max_tokens = 8
    engine = _FakeEngine(core, expert, max_tokens=max_tokens, max_slots=3)
    got = engine.run([(p, None if s is None else s.to_extra_args()) for p, s in zip(prompts, settings)])
    assert len(core.table) == 0  # every finished request was removed
    for prompt, s, tokens in zip(prompts, settings, got):
        if s is None:
            processor = None
        elif s.method == "cd":
            processor = ContrastiveDecodingLogitsProcessor(
                amateur_model, alpha=s.alpha, beta=s.beta, formulation=s.cd_formulation,
                amateur_temperature=s.amateur_temperature, pad_token_id=0,
            )
        else:
            processor = ContrastiveInputLogitsProcessor(
                expert, torch.tensor([contrastive]), cid_lambda=s.cid_lambda, alpha=s.alpha, pad_token_id=0
            )
        assert _trim(tokens) == _trim(_reference(expert, prompt, processor, max_tokens)), s
    # the contrast actually changes something on these prompts (else the test would prove little)
    plain = [_trim(_reference(expert, p, None, max_tokens)) for p in prompts]
    assert any(_trim(g) != p for g, p, s in zip(got, plain, settings) if s is not None and s.method == "cd")


def test_rows_of_non_contrastive_requests_are_untouched():
    core = ContrastiveProcessorCore("unused", resolve_amateur=lambda *a: pytest.fail("no amateur needed"))
    core.update([], [(0, _Params(None), [1, 2], []), (1, _Params({"unrelated": 1}), [1], [])], [])
    logits = torch.randn(2, 384)
    assert torch.equal(core.apply(logits.clone()), logits)


# ---------------------------------------------------------------- amateur resolution
def test_get_amateur_builds_early_exit_and_self_from_the_served_folder(tmp_path, tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    expert.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    clear_amateurs()
    try:
        early = get_amateur("early-exit:2", str(tmp_path))
        assert get_amateur("early-exit:2", str(tmp_path)) is early  # loaded once
        ids = torch.tensor([[1, 40, 41, 42]])
        with torch.inference_mode():
            reference = EarlyExitAmateur(expert, 2).model(ids).logits
            torch.testing.assert_close(early.model(ids).logits, reference)
            torch.testing.assert_close(get_amateur("self", str(tmp_path)).model(ids).logits, expert(ids).logits)
        other = testing.tiny_llama(seed=3)
        register_amateur("mine", other)
        assert get_amateur("mine", str(tmp_path)).model is other
        with pytest.raises(ValueError, match="early-exit:N"):
            get_amateur("early-exit:x", str(tmp_path))
    finally:
        clear_amateurs()


def test_hf_amateur_cache_matches_full_recompute():
    model = testing.tiny_llama(seed=1)
    amateur = HFAmateur(model)
    output: list[int] = []
    state = RequestState(ContrastParams(method="cd", amateur="a"), [1, 50, 60], output, amateur)
    for token in (70, 80, 90, None):
        logits = state.amateur_logits()
        with torch.inference_mode():
            full = model(torch.tensor([[1, 50, 60] + output])).logits[0, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        if token is not None:
            output.append(token)


# ---------------------------------------------------------------- backend helpers (no vLLM needed)
def test_method_objects_become_names_hyperparameters_and_amateur_specs(tiny_tokenizer):
    from cdlm.decoding.contrastive_decoding import ContrastiveDecodingMethod
    from cdlm.decoding.vllm.backend import _method_spec
    from cdlm.models.amateur import make_separate_amateur

    expert = testing.tiny_llama(seed=0)
    method = ContrastiveDecodingMethod(expert, tiny_tokenizer, amateur=EarlyExitAmateur(expert, 2), beta=0.7)
    name, params, spec = _method_spec(method, None, None)
    assert (name, spec, params["beta"], params["cd_formulation"]) == ("cd", "early-exit:2", 0.7, "obrien-lewis")
    separate = make_separate_amateur(expert, tiny_tokenizer, testing.tiny_llama(seed=1), testing.tiny_tokenizer(),
                                     amateur_name="tiny-1")
    clear_amateurs()
    try:
        _, _, spec = _method_spec(ContrastiveDecodingMethod(expert, tiny_tokenizer, amateur=separate), None, None)
        assert spec == "tiny-1" and get_amateur("tiny-1", "unused").model is separate.model
    finally:
        clear_amateurs()
    assert _method_spec("cid", {"cid_lambda": 1.0}, None) == ("cid", {"cid_lambda": 1.0}, None)


def test_token_stripping_stops_at_eos_and_drops_trailing_padding():
    from cdlm.decoding.runner import strip_generated

    cases = {(5, 6, 2, 7): [5, 6], (5, 0, 0): [5], (2,): [], (): [], (5, 6): [5, 6]}
    for ids, expected in cases.items():
        assert strip_generated(list(ids), {2}, 0) == expected
    assert strip_generated([5, 2, 2], {2}, 2) == [5]  # pad == eos: the first EOS ends the text
