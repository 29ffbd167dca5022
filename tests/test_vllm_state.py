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
from cdlm.decoding.vllm.params import ContrastParams
from cdlm.decoding.vllm.state import BatchedAmateur, RequestState, RequestTable
from cdlm.models.amateur import EarlyExitAmateur

EOS = 2


# ---------------------------------------------------------------- settings
def test_params_round_trip_through_json_and_use_the_contrast_modules_rule():
    cd = ContrastParams(method="cd", amateur="early-exit:8", beta=0.8, cd_formulation="obrien-lewis")
    extra = json.loads(json.dumps(cd.to_extra_args()))  # what survives vLLM's IPC / the HTTP body's vllm_xargs
    assert extra == {
        "cdlm_method": "cd",
        "cdlm_amateur": "early-exit:8",
        "cdlm_alpha": 0.1,
        "cdlm_beta": 0.8,
        "cdlm_amateur_temperature": 1.0,
        "cdlm_cd_formulation": "obrien-lewis",
        "cdlm_eos_promotion": "forbid",
    }
    assert ContrastParams.from_extra_args(extra) == cd
    # Li's form has no beta: it is not written, and a request that gives one is refused (not recorded as used)
    li = ContrastParams(method="cd", amateur="early-exit:8", beta=0.8, cd_formulation="li").to_extra_args()
    assert "cdlm_beta" not in li and ContrastParams.from_extra_args(li).settings.weight == 1.0
    with pytest.raises(ValueError, match="cdlm_beta: beta is not used"):
        ContrastParams.from_extra_args({**li, "cdlm_beta": 0.8})
    cid = ContrastParams(method="cid", contrastive_prompt_token_ids=[5, 6, 7])
    assert ContrastParams.from_extra_args(json.loads(json.dumps(cid.to_extra_args()))) == cid
    assert cid.amateur == "self" and cid.contrastive_prompt_token_ids == (5, 6, 7)
    # the weight rule is contrast.py's: Li's CD ignores beta
    assert ContrastParams(method="cd", amateur="x", cd_formulation="li", beta=3.0).settings.weight == 1.0
    assert ContrastParams(method="cid", contrastive_prompt_token_ids=[1], cid_lambda=0.7).settings.weight == 0.7


def test_non_contrastive_requests_parse_to_none():
    assert ContrastParams.from_extra_args(None) is None
    assert ContrastParams.from_extra_args({}) is None
    assert ContrastParams.from_extra_args({"other_plugin": 1}) is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "cs"}, "cdlm_method must be one of"),
        ({"beta": 0.5}, "without cdlm_method"),
        ({"method": "cd"}, "needs cdlm_amateur"),
        ({"method": "cd", "amateur": "a", "alpha": 0.0}, "alpha"),
        ({"method": "cd", "amateur": "a", "alpha": 1.5}, "alpha"),
        ({"method": "cd", "amateur": "a", "alpha": "high"}, "alpha"),
        ({"method": "cd", "amateur": "a", "beta": -1.0}, "beta"),
        ({"method": "cd", "amateur": "a", "amateur_temperature": 0}, "amateur_temperature"),
        ({"method": "cd", "amateur": "a", "alpha": float("nan")}, "finite"),
        ({"method": "cd", "amateur": "a", "cd_formulation": "obrien"}, "formulation"),
        ({"method": "cd", "amateur": "early-exit:x"}, "early-exit:N"),
        ({"method": "cd", "amateur": "early-exit:0"}, "at least 1 layer"),
        ({"method": "cd", "amateur": "a", "cid_lambda": 1.0}, "not setting"),
        ({"method": "cid", "contrastive_prompt_token_ids": [1], "beta": 1.0}, "not setting"),
        ({"method": "cd", "amateur": "a", "contrastive_prompt_token_ids": [1]}, "only used by method 'cid'"),
        ({"method": "cid"}, "needs cdlm_contrastive_prompt_token_ids"),
        ({"method": "cid", "contrastive_prompt_token_ids": "1 2"}, "list of token ids"),
        ({"method": "cid", "contrastive_prompt_token_ids": [1, -3]}, "non-negative"),
        (
            {"method": "cid", "contrastive_prompt_token_ids": [1], "amateur": "other"},
            "contrasts the expert with itself",
        ),
        ({"method": "cid", "contrastive_prompt_token_ids": [1], "cid_lambda": -0.1}, "lambda"),
        ({"method": "cd", "amateur": "a", "lambda": 1}, "unknown cdlm setting"),
    ],
)
def test_bad_settings_raise_value_errors_naming_the_problem(settings, message):
    with pytest.raises(ValueError, match=message):
        ContrastParams.from_extra_args({f"cdlm_{k}": v for k, v in settings.items()})


def test_contrast_bounds_keep_scores_finite_and_bind_both_backends():
    """The bounds live in the rule (cdlm.decoding.contrast), so transformers and vLLM refuse the same values;
    inside them the scores stay finite on extreme logits, while 1e308 / 1e-300 turn them into inf/nan."""
    from cdlm.decoding.contrast import MAX_WEIGHT, TEMPERATURE_RANGE, ContrastSettings, contrast

    expert = torch.tensor([[30.0, -30.0, 0.0, 29.0]])
    amateur = torch.tensor([[-40.0, 40.0, 1.0, 0.0]])
    for formulation in ("obrien-lewis", "li"):
        for temperature in TEMPERATURE_RANGE:
            scores = ContrastSettings(formulation, 1e-3, MAX_WEIGHT, temperature).apply(expert, amateur)
            assert not scores.isnan().any() and scores.isfinite().sum() == 2
    assert not contrast(expert, amateur, alpha=1.0, weight=1e308, formulation="obrien-lewis").isfinite().any()
    too_cold = contrast(expert, amateur, alpha=1.0, weight=1.0, formulation="li", other_temperature=1e-300)
    assert not too_cold.isfinite().any()
    with pytest.raises(ValueError, match="beta must be <= 100, got 100.5"):
        ContrastSettings.for_cd(beta=100.5, formulation="obrien-lewis")
    with pytest.raises(ValueError, match=r"amateur_temperature must be in \[0.01, 100\], got 1e-300"):
        ContrastSettings.for_cd(amateur_temperature=1e-300)
    with pytest.raises(ValueError, match=r"lambda \(cid_lambda\) must be <= 100"):
        ContrastSettings.for_cid(cid_lambda=1e308)
    with pytest.raises(ValueError, match="beta must be <= 100"):  # the same rule on a vLLM request
        ContrastParams.from_extra_args(
            {"cdlm_method": "cd", "cdlm_amateur": "a", "cdlm_cd_formulation": "obrien-lewis", "cdlm_beta": 1e308}
        )


def test_a_nested_cdlm_dict_is_refused_not_ignored():
    with pytest.raises(ValueError, match="flat extra_args keys"):
        ContrastParams.from_extra_args({"cdlm": {"method": "cd", "amateur": "a"}})


# ---------------------------------------------------------------- the batched amateur
def _full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _state(prefix, output=None):
    return RequestState(ContrastParams(method="cd", amateur="a"), list(prefix), [] if output is None else output)


def test_batched_amateur_equals_unbatched_recompute_as_rows_join_leave_and_stall():
    """Rows of different lengths join at different steps, one skips a step (chunked prefill), one
    leaves, one is re-added with its output (preemption): every row's logits equal a full batch-1
    recompute of its context, with one decode forward per step (plus one prefill when rows join)."""
    model = testing.tiny_llama(seed=1)
    amateur = BatchedAmateur(model)
    assert amateur.batched
    a = _state([1, 50, 60, 70, 80, 90, 100])
    b = _state([1, 40])
    c = _state([1, 30, 31, 32])
    live = [a, b]
    for state in live:
        amateur.join(state)
    step_tokens = {a: [11, 12, 13, 14, 15, 16], b: [21, 22, 23, 24, 25, 26], c: [31, 32, 33, 34, 35, 36]}
    for step in range(6):
        forwards = amateur.forwards
        joined = False
        if step == 2:
            amateur.join(c)
            live.append(c)
            joined = True
        if step == 4:  # b is preempted: it leaves and comes back as a newcomer holding its output so far
            amateur.leave(b)
            assert amateur.rows == 2
            amateur.join(b)
            joined = True
        got = amateur.logits(live)
        assert amateur.forwards - forwards <= 1 + joined
        for state, logits in zip(live, got):
            torch.testing.assert_close(
                logits, _full_logits(model, state.prefix + state.output_ids), rtol=1e-4, atol=1e-4
            )
        for state in live:
            if not (state is c and step == 3):  # c produced no token at step 3 (a chunked-prefill step)
                state.output_ids.append(step_tokens[state][step])
    columns = amateur.cache_columns()
    amateur.leave(a)  # the longest row leaves: its columns are cut
    assert amateur.cache_columns() < columns
    for state in list(live[1:]):
        amateur.leave(state)
    assert amateur.rows == 0 and amateur.cache_columns() == 0  # memory freed when the last request leaves


def test_models_with_sliding_window_layers_run_one_row_per_group():
    model = testing.tiny_gemma3(seed=0)
    amateur = BatchedAmateur(model)
    assert not amateur.batched
    states = [_state([1, 40, 41]), _state([1, 50, 51, 52, 53])]
    for step in range(3):
        got = amateur.logits(states)
        for state, logits in zip(states, got):
            torch.testing.assert_close(
                logits, _full_logits(model, state.prefix + state.output_ids), rtol=1e-4, atol=1e-4
            )
        for state in states:
            state.output_ids.append(60 + step)


def test_placeholder_ids_from_async_scheduling_are_rejected():
    amateur = BatchedAmateur(testing.tiny_llama(seed=1))
    with pytest.raises(RuntimeError, match="async scheduling"):
        amateur.logits([_state([1], [-1])])


def test_request_table_applies_removed_added_moved_in_order_and_reports_leavers():
    left = []
    table = RequestTable(on_remove=left.append)
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
    assert left == ["b", "d"]


# ---------------------------------------------------------------- fake engine vs transformers
@dataclass
class _Params:
    extra_args: dict | None


class _FakeEngine:
    """vLLM's v1 persistent-batch protocol, with the expert run by transformers (full recompute).

    Requests fill freed slots, holes are condensed by one-way moves, two slots are swapped at
    ``swap_at``, and at ``preempt_at`` (step, request) the request is preempted: removed, then
    re-added later with its output so far, as vLLM's scheduler does. ``publish_early_exit`` (layer,
    model) plays cdlm's engine model class: it publishes that model's logits for every row each step.
    """

    def __init__(self, core, expert, max_tokens, max_slots, swap_at=2, preempt_at=None, publish_early_exit=None):
        self.core, self.expert, self.max_tokens, self.max_slots = core, expert, max_tokens, max_slots
        self.swap_at, self.preempt_at, self.publish_early_exit = swap_at, preempt_at, publish_early_exit
        self.steps = 0

    def run(self, requests: list[tuple[list[int], dict | None]]) -> list[list[int]]:
        from cdlm.decoding.vllm.early_exit import publish

        waiting = deque(range(len(requests)))
        outputs = [[] for _ in requests]
        limits = self.max_tokens if isinstance(self.max_tokens, list) else [self.max_tokens] * len(requests)
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
            contexts = [requests[rid][0] + outputs[rid] for rid in slots]
            with torch.inference_mode():
                logits = torch.stack([self.expert(torch.tensor([c])).logits[0, -1].float() for c in contexts])
                if self.publish_early_exit is not None:
                    layer, model = self.publish_early_exit
                    publish(
                        "fake-engine", {layer: torch.stack([model(torch.tensor([c])).logits[0, -1] for c in contexts])}
                    )
                logits = self.core.apply(logits)  # vLLM's sampler also runs under inference mode
            for index, rid in enumerate(slots):
                token = int(logits[index].argmax())
                outputs[rid].append(token)
                if token == EOS or len(outputs[rid]) >= limits[rid]:
                    slots[index] = None
                    removed.append(index)
            if self.preempt_at is not None and step == self.preempt_at[0] and self.preempt_at[1] in slots:
                index = slots.index(self.preempt_at[1])
                slots[index] = None
                removed.append(index)
                waiting.appendleft(self.preempt_at[1])  # re-added later with its output so far
            step += 1
        self.core.update(removed, [], [])  # the batch update vLLM sends before its next step
        self.steps = step
        return outputs


def _reference(expert, prompt: list[int], processor, max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = {"logits_processor": LogitsProcessorList([processor])} if processor is not None else {}
    with torch.inference_mode():
        out = expert.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def _trim(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


class _CountingResolver:
    """Resolves specs to one shared ``BatchedAmateur`` per model, as ``get_amateur`` does."""

    def __init__(self, models: dict):
        self.amateurs = {spec: BatchedAmateur(model) for spec, model in models.items()}

    def __call__(self, spec, source, device, dtype):
        return self.amateurs[spec]


def _transformers_processor(s: ContrastParams, expert, amateur_model, contrastive):
    if s is None:
        return None
    if s.method == "cd":
        return ContrastiveDecodingLogitsProcessor(
            amateur_model,
            alpha=s.alpha,
            beta=s.beta,
            formulation=s.cd_formulation,
            amateur_temperature=s.amateur_temperature,
            pad_token_id=0,
        )
    return ContrastiveInputLogitsProcessor(
        expert, torch.tensor([contrastive]), cid_lambda=s.cid_lambda, alpha=s.alpha, pad_token_id=0
    )


TEXTS = [
    "The quick brown fox",
    "Once upon a time",
    "Hello",
    "Numbers: 1 2 3",
    "A cat sat",
    "Why is the sky",
    "Over the hills and far away",
    "Tea",
]


@pytest.mark.parametrize("preempt", [None, (3, 0)], ids=["no-preemption", "preempt-request-0-at-step-3"])
def test_fake_engine_matches_transformers_processors_with_mixed_requests(tiny_tokenizer, preempt):
    """Mixed CD / CID / greedy requests of different lengths and output limits, finishing at
    different steps, condensed, swapped and (optionally) preempted, equal transformers' processors,
    with one amateur forward per step per amateur model (plus one prefill on steps where rows join)."""
    expert = testing.tiny_llama(seed=0)
    amateur_model = testing.tiny_llama(seed=1)
    resolver = _CountingResolver({"tiny": amateur_model, "self": expert})
    core = ContrastiveProcessorCore("unused", resolve_amateur=resolver)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    contrastive = tiny_tokenizer("Generic text")["input_ids"]
    settings = [
        ContrastParams(method="cd", amateur="tiny", beta=0.5),
        None,  # a plain greedy request sharing the batch
        ContrastParams(method="cid", contrastive_prompt_token_ids=contrastive, cid_lambda=0.8),
        ContrastParams(method="cd", amateur="tiny", cd_formulation="li", alpha=0.05, amateur_temperature=0.7),
        ContrastParams(method="cd", amateur="tiny", beta=1.0),
        ContrastParams(method="cid", contrastive_prompt_token_ids=contrastive, cid_lambda=0.0),
        ContrastParams(method="cd", amateur="tiny", beta=0.5),
        ContrastParams(method="cid", contrastive_prompt_token_ids=contrastive, cid_lambda=0.5),
    ]
    limits = [8, 5, 9, 3, 8, 6, 7, 4]  # requests finish at different steps
    engine = _FakeEngine(core, expert, max_tokens=limits, max_slots=4, preempt_at=preempt)
    got = engine.run([(p, None if s is None else s.to_extra_args()) for p, s in zip(prompts, settings)])
    assert len(core.table) == 0  # every finished request was removed
    for amateur in resolver.amateurs.values():
        assert amateur.rows == 0 and amateur.cache_columns() == 0  # and its cache rows freed
        assert amateur.forwards <= 2 * engine.steps  # decode + (on join steps) prefill, never per request
    assert resolver.amateurs["tiny"].forwards < sum(
        limits[i] for i, s in enumerate(settings) if s and s.method == "cd"
    )
    for prompt, s, tokens, limit in zip(prompts, settings, got, limits):
        processor = _transformers_processor(s, expert, amateur_model, contrastive)
        assert _trim(tokens) == _trim(_reference(expert, prompt, processor, limit)), s
    # the contrast actually changes something on these prompts (else the test would prove little)
    plain = [_trim(_reference(expert, p, None, limit)) for p, limit in zip(prompts, limits)]
    assert any(_trim(g) != p for g, p, s in zip(got, plain, settings) if s is not None and s.method == "cd")


def test_engine_early_exit_rows_match_the_transformers_early_exit_processor(tiny_tokenizer):
    """Early-exit logits published by the engine's model (here: the fake engine) are used by row
    index, through condensing moves and swaps, and give transformers' early-exit CD tokens."""
    expert = testing.tiny_llama(seed=0)
    early = EarlyExitAmateur(expert, 2).model
    core = ContrastiveProcessorCore(
        "unused", resolve_amateur=lambda *a: pytest.fail("no separate amateur"), engine_early_exit=("fake-engine", [2])
    )
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:6]]
    settings = [ContrastParams(method="cd", amateur="early-exit:2", beta=b) for b in (0.5, 1.0, 0.5, 2.0, 0.1, 0.5)]
    settings[2] = None
    limits = [6, 3, 5, 7, 4, 6]
    engine = _FakeEngine(core, expert, max_tokens=limits, max_slots=3, publish_early_exit=(2, early))
    got = engine.run([(p, None if s is None else s.to_extra_args()) for p, s in zip(prompts, settings)])
    for prompt, s, tokens, limit in zip(prompts, settings, got, limits):
        assert _trim(tokens) == _trim(
            _reference(expert, prompt, _transformers_processor(s, expert, early, None), limit)
        )
    plain = [_trim(_reference(expert, p, None, limit)) for p, limit in zip(prompts, limits)]
    assert any(_trim(g) != p for g, p, s in zip(got, plain, settings) if s is not None)


class _FlakyAmateur(BatchedAmateur):
    """A batched amateur whose ``fail_at``-th forward raises (as an out-of-memory error would)."""

    def __init__(self, model, fail_at: int):
        super().__init__(model)
        self.fail_at = fail_at

    def _forward(self, *args):
        if self.forwards + 1 == self.fail_at:
            self.forwards += 1
            raise RuntimeError("amateur forward failed")
        return super()._forward(*args)


def test_requests_that_fail_inside_the_engine_end_at_once_and_the_others_are_served(tiny_tokenizer, caplog):
    """An amateur that cannot be built, settings that reach the engine unchecked, and an amateur whose
    forward fails mid-run: each ends only its own requests (EOS as their next token, logged); every
    other request gives transformers' tokens, and no exception leaves the processor."""
    expert = testing.tiny_llama(seed=0)
    amateur_model = testing.tiny_llama(seed=1)
    good = BatchedAmateur(amateur_model)
    flaky = _FlakyAmateur(testing.tiny_llama(seed=2), fail_at=3)

    def resolve(spec, source, device, dtype):
        if spec == "broken":
            raise RuntimeError("cannot build this amateur")
        return {"tiny": good, "flaky": flaky}[spec]

    core = ContrastiveProcessorCore("unused", resolve_amateur=resolve, eos_ids=[EOS])
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:6]]
    settings = [
        ContrastParams(method="cd", amateur="tiny", beta=0.5, cd_formulation="obrien-lewis").to_extra_args(),
        ContrastParams(method="cd", amateur="broken").to_extra_args(),
        None,
        {"cdlm_method": "cd", "cdlm_amateur": "early-exit:x"},  # unvalidated: the parse fails in the engine
        ContrastParams(method="cd", amateur="flaky").to_extra_args(),
        ContrastParams(method="cd", amateur="flaky").to_extra_args(),
    ]
    limit = 6
    with caplog.at_level("ERROR", logger="cdlm.decoding.vllm.core"):
        got = _FakeEngine(core, expert, max_tokens=limit, max_slots=6).run(list(zip(prompts, settings)))
    assert got[1] == [EOS] and got[3] == [EOS]  # ended at their first step
    flaky_params = ContrastParams(method="cd", amateur="flaky")
    for i in (4, 5):
        reference = _reference(expert, prompts[i], _transformers_processor(flaky_params, expert, flaky.model, None), 2)
        assert EOS not in reference
        # the failing forward is the amateur's third (prefill, two decode steps): two real tokens, then EOS
        assert got[i] == reference + [EOS]
    tiny_params = ContrastParams(method="cd", amateur="tiny", beta=0.5, cd_formulation="obrien-lewis")
    tiny_processor = _transformers_processor(tiny_params, expert, amateur_model, None)
    assert _trim(got[0]) == _trim(_reference(expert, prompts[0], tiny_processor, limit))
    assert _trim(got[2]) == _trim(_reference(expert, prompts[2], None, limit))
    assert len(core.table) == 0 and good.rows == 0 and flaky.rows == 0  # failed rows freed their cache rows
    failures = [r.getMessage() for r in caplog.records if "failed inside the engine" in r.getMessage()]
    assert len(failures) == 4 and any("cannot build this amateur" in m for m in failures)
    assert any("early-exit:N" in m for m in failures) and any("amateur forward failed" in m for m in failures)


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


# ---------------------------------------------------------------- admission checks against the served model
def test_requests_are_checked_against_the_served_model(tmp_path, tiny_tokenizer, monkeypatch):
    """What ended vLLM's engine before (too-deep early exits, out-of-vocabulary or too-long CID input,
    amateurs that do not exist or tokenize differently) is refused at admission, naming the setting."""
    from cdlm.decoding.vllm.served import SERVED_ENV, ServedModel, check_request

    def save(folder, model, tokenizer):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)

    expert = save(tmp_path / "expert", testing.tiny_llama(seed=0), tiny_tokenizer)  # 4 layers, 384 ids
    same_vocab = save(tmp_path / "same", testing.tiny_llama(seed=5, num_layers=2), tiny_tokenizer)
    other_vocab = save(tmp_path / "other", testing.tiny_llama(seed=5, vocab_size=320), testing.tiny_tokenizer(320))
    served = ServedModel(expert, max_model_len=64, early_exit_layers=(2,))
    assert ServedModel.from_env({SERVED_ENV: served.to_env()}) == served
    with pytest.raises(ValueError, match=SERVED_ENV):
        ServedModel.from_env({SERVED_ENV: "{not json"})

    def check(max_tokens=4, **settings):
        check_request(ContrastParams(**settings), served, max_tokens)

    for spec in ("early-exit:1", "early-exit:2", "early-exit:3", "self", same_vocab):
        check(method="cd", amateur=spec)
    check(method="cid", contrastive_prompt_token_ids=[0, 383], max_tokens=62)  # 2 + 62 = max_model_len
    refused = [
        (dict(method="cd", amateur="early-exit:4"), "cdlm_amateur 'early-exit:4': the served model has 4 decoder"),
        (dict(method="cd", amateur=str(tmp_path / "missing")), "cdlm_amateur .*missing' cannot be used"),
        (dict(method="cd", amateur="no-such-model-xyz"), "cdlm_amateur 'no-such-model-xyz' cannot be used"),
        (dict(method="cd", amateur=other_vocab), "cannot be used: tokenizers of the served model"),
        (dict(method="cid", contrastive_prompt_token_ids=[5, 384]), "id 384 is outside .* vocabulary"),
        (dict(method="cid", contrastive_prompt_token_ids=[0, 383], max_tokens=63), "exceed max_model_len 64"),
    ]
    for settings, message in refused:
        with pytest.raises(ValueError, match=message):
            check(**settings)
    # the processor's admission hook reads the served model from the environment cdlm serve / load_vllm set
    monkeypatch.setenv(SERVED_ENV, served.to_env())
    with pytest.raises(ValueError, match="4 decoder layers"):
        ContrastiveProcessorCore.validate({"cdlm_method": "cd", "cdlm_amateur": "early-exit:9"}, 4)
    monkeypatch.delenv(SERVED_ENV)  # unknown served model (plain `vllm serve`): only model-free checks
    assert ContrastiveProcessorCore.validate({"cdlm_method": "cd", "cdlm_amateur": "early-exit:9"}, 4) is not None


# ---------------------------------------------------------------- backend helpers (no vLLM needed)
def test_method_objects_become_names_hyperparameters_and_amateur_specs(tiny_tokenizer):
    from cdlm.decoding.contrastive_decoding import ContrastiveDecodingMethod
    from cdlm.decoding.vllm.backend import _method_spec
    from cdlm.models.amateur import make_separate_amateur

    expert = testing.tiny_llama(seed=0)
    method = ContrastiveDecodingMethod(
        expert, tiny_tokenizer, amateur=EarlyExitAmateur(expert, 2), beta=0.7, cd_formulation="obrien-lewis"
    )
    name, params, spec = _method_spec(method, None, None)
    assert (name, spec, params["beta"], params["cd_formulation"]) == ("cd", "early-exit:2", 0.7, "obrien-lewis")
    assert params["eos_promotion"] == "forbid"  # the methods' default reaches the vLLM request
    separate = make_separate_amateur(
        expert, tiny_tokenizer, testing.tiny_llama(seed=1), testing.tiny_tokenizer(), amateur_name="tiny-1"
    )
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


# ---------------------------------------------------------------- cdlm serve's command line (server: test_vllm_server)
def test_serve_command_loads_the_processor_by_name_with_early_exit_and_extra_vllm_args(tmp_path):
    import shlex

    from cdlm.cli import build_parser
    from cdlm.cli.serve_cmd import PROCESSOR, vllm_serve_argv
    from cdlm.decoding.vllm.early_exit import CONFIG_KEY

    testing.tiny_llama(seed=0).save_pretrained(tmp_path)
    args = build_parser().parse_args(
        [
            "serve",
            str(tmp_path),
            "--dtype",
            "float32",
            "--early-exit-layers",
            "3",
            "1",
            "--vllm-args",
            "--generation-config vllm --seed 3",
        ]
    )
    argv = vllm_serve_argv(args)
    joined = shlex.join(argv)
    assert argv[argv.index("--logits-processors") + 1] == PROCESSOR
    assert "--no-async-scheduling" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["CdlmLlamaForCausalLM"], CONFIG_KEY: [1, 3]}
    assert joined.endswith("--generation-config vllm --seed 3")
    bad = build_parser().parse_args(["serve", str(tmp_path), "--dtype", "float32", "--tensor-parallel-size", "0"])
    with pytest.raises(ValueError, match="--tensor-parallel-size must be >= 1"):
        vllm_serve_argv(bad)
    # requests are checked against cdlm serve's own values, so --vllm-args may not change them
    for extra, own in [("--max-model-len 4096", "--max-model-len"), ("--hf-overrides={}", "--early-exit-layers")]:
        args = build_parser().parse_args(["serve", str(tmp_path), "--dtype", "float32", f"--vllm-args={extra}"])
        with pytest.raises(ValueError, match=f"is set by cdlm serve; use {own}"):
            vllm_serve_argv(args)


def test_serve_without_vllm_is_one_line_naming_the_setup_script():
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    done = subprocess.run([sys.executable, "-m", "cdlm.cli", "serve"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("cdlm serve: error: cdlm serve needs vLLM") and done.stderr.count("\n") == 1
    assert "bash scripts/setup_vllm.sh" in done.stderr and "Traceback" not in done.stderr


def test_early_exit_capture_is_refused_for_architectures_without_aux_hidden_states():
    from cdlm.decoding.vllm.early_exit import engine_overrides

    with pytest.raises(ValueError, match="Gemma3ForCausalLM"):
        engine_overrides("Gemma3ForCausalLM", [4])
    with pytest.raises(ValueError, match=">= 1"):
        engine_overrides("LlamaForCausalLM", [0])


def test_in_process_data_parallel_and_bad_tensor_parallel_sizes_are_refused():
    from cdlm.decoding.vllm import load_vllm

    with pytest.raises(ValueError, match="cdlm serve --data-parallel-size"):
        load_vllm("unused", data_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        load_vllm("unused", tensor_parallel_size=0)


def test_eos_promotion_reaches_the_vllm_rule_as_in_the_transformers_methods():
    """vLLM rows use the same rule object as the transformers processors: forbid protects the EOS ids."""
    from cdlm.decoding.contrast import ContrastSettings
    from cdlm.decoding.vllm.backend import _method_spec

    _, params, _ = _method_spec("cd", {"cd_formulation": "obrien-lewis", "eos_promotion": "allow"}, "early-exit:2")
    assert params == {"cd_formulation": "obrien-lewis", "eos_promotion": "allow"}
    with pytest.raises(ValueError, match="beta is not used by contrastive decoding's li formulation"):
        _method_spec("cd", {"beta": 1.0}, "early-exit:2")  # as the transformers registry refuses it
    forbid = ContrastParams(method="cd", amateur="early-exit:2")  # default: forbid
    allow = ContrastParams(method="cd", amateur="early-exit:2", eos_promotion="allow")
    assert forbid.rule((EOS,)) == ContrastSettings.for_cd().forbidding_promotion_of([EOS])
    assert allow.rule((EOS,)) == ContrastSettings.for_cd() and allow.rule((EOS,)).special_ids == ()
    with pytest.raises(ValueError, match="eos_promotion must be one of"):
        ContrastParams(method="cd", amateur="early-exit:2", eos_promotion="never")
