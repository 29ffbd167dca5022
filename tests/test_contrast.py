"""The contrast rule and the shared model-side helpers, on small hand-built tensors and tiny models.

Expected values are computed by hand in the comments (natural logs), not with cdlm's code.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    GenerationConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LogitsProcessorList,
)

from cdlm import testing
from cdlm.decoding import contrast as contrast_module
from cdlm.decoding import contrastive_decoding as cd_module
from cdlm.decoding import contrastive_input as cid_module
from cdlm.decoding.contrast import (
    ContrastSettings,
    contrast,
    plausible_mask,
)
from cdlm.decoding.contrastive_decoding import ContrastiveDecodingLogitsProcessor, EarlyExitContrastiveLogitsProcessor
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.decoding.methods import ContrastiveDecodingMethod, ContrastiveInputMethod
from cdlm.models import EarlyExitAmateur, early_exit_spec, parse_early_exit
from cdlm.models import amateur as amateur_module
from cdlm.models.lm_head import LogitTransform, chunked, head_logits
from cdlm.models.prompts import (
    adds_special_tokens,
    check_fits_context,
    context_length,
    eos_token_ids,
    render_prompts,
)

INF = math.inf
LOG = math.log


def _log(*probabilities):
    return torch.log(torch.tensor([probabilities], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- exact values
# Expert p = (0.5, 0.3, 0.15, 0.05), amateur p = (0.6, 0.1, 0.2, 0.1): both already normalised.
EXPERT = _log(0.5, 0.3, 0.15, 0.05)
AMATEUR = _log(0.6, 0.1, 0.2, 0.1)


def test_li_rule_exact_values():
    # alpha 0.5: keep p >= 0.25 -> tokens 0, 1.  log(.5/.6) = -0.18232, log(.3/.1) = log 3 = 1.09861.
    got = contrast(EXPERT, AMATEUR, alpha=0.5, weight=1.0, formulation="li")
    expected = torch.tensor([[LOG(0.5 / 0.6), LOG(3.0), -INF, -INF]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_li_rule_with_weight_exact_values():
    # weight 0.5, alpha 0.25: keep p >= 0.125 -> tokens 0, 1, 2; score = lp_e - 0.5 lp_a.
    got = contrast(EXPERT, AMATEUR, alpha=0.25, weight=0.5, formulation="li")
    expected = [LOG(0.5) - 0.5 * LOG(0.6), LOG(0.3) - 0.5 * LOG(0.1), LOG(0.15) - 0.5 * LOG(0.2), -INF]
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-6)


def test_obrien_lewis_rule_exact_values():
    # beta 0.5: 1.5 lp_e - 0.5 lp_a; alpha 0.1 keeps p >= 0.05 -> all four tokens.
    got = contrast(EXPERT, AMATEUR, alpha=0.1, weight=0.5, formulation="obrien-lewis")
    probs_e, probs_a = (0.5, 0.3, 0.15, 0.05), (0.6, 0.1, 0.2, 0.1)
    expected = [1.5 * LOG(e) - 0.5 * LOG(a) for e, a in zip(probs_e, probs_a)]
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-6)
    # The greedy choice flips from token 0 (greedy) to token 1: 1.5 log .3 - .5 log .1 = -0.65466 > -0.78429.
    assert int(got.argmax()) == 1 and int(EXPERT.argmax()) == 0


def test_rule_is_invariant_to_a_per_row_shift_of_either_side():
    """Raw logits and log-probs give the same scores (generate passes either)."""
    shifted = contrast(EXPERT + 7.0, AMATEUR - 3.0, alpha=0.1, weight=0.5, formulation="obrien-lewis")
    torch.testing.assert_close(shifted, contrast(EXPERT, AMATEUR, alpha=0.1, weight=0.5, formulation="obrien-lewis"))


def test_amateur_temperature_exact_values():
    # Amateur logits (0, log 2) at tau = 0.5 -> (0, 2 log 2) -> p_a = (1/5, 4/5).
    expert = _log(0.6, 0.4)
    amateur = torch.tensor([[0.0, LOG(2.0)]], dtype=torch.float64)
    got = contrast(expert, amateur, alpha=0.5, weight=1.0, formulation="li", other_temperature=0.5)
    expected = [LOG(0.6) - LOG(0.2), LOG(0.4) - LOG(0.8)]
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-6)


def test_weight_zero_is_expert_log_probs_even_where_the_other_side_is_minus_inf():
    other = torch.tensor([[0.0, -INF, 0.0, 0.0]], dtype=torch.float64)
    got = contrast(EXPERT, other, alpha=0.2, weight=0.0, formulation="li")  # keep p >= 0.1
    expected = [LOG(0.5), LOG(0.3), LOG(0.15), -INF]
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-6)
    assert not torch.isnan(got).any()


def test_vocabularies_of_different_sizes_contrast_the_common_ids():
    # Expert scores 5 ids, amateur 3: only ids 0..2 are contrasted (renormalised over them), 3..4 get -inf.
    expert = _log(0.4, 0.2, 0.2, 0.1, 0.1)
    amateur = _log(0.5, 0.25, 0.25)
    got = contrast(expert, amateur, alpha=0.1, weight=1.0, formulation="li")
    # common-range expert p = (0.5, 0.25, 0.25): scores log(.5/.5) = 0, log(.25/.25) = 0, 0.
    torch.testing.assert_close(
        got, torch.tensor([[0.0, 0.0, 0.0, -INF, -INF]], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_plausible_mask_keeps_exactly_the_tokens_above_alpha_max():
    lp = _log(0.4, 0.2, 0.19, 0.21)
    assert plausible_mask(lp, 0.5).tolist() == [[True, True, False, True]]  # cutoff p = 0.2 (0.2 kept, 0.19 not)
    assert plausible_mask(lp, 1.0).tolist() == [[True, False, False, False]]
    # Ties at the maximum are all kept; rows are independent.
    two_rows = torch.cat([_log(0.25, 0.25, 0.25, 0.25), _log(0.7, 0.1, 0.1, 0.1)])
    assert plausible_mask(two_rows, 0.2).tolist() == [[True] * 4, [True, False, False, False]]


def test_contrast_keeps_the_dtype_and_never_modifies_its_inputs():
    expert, amateur = EXPERT.float(), AMATEUR.float()
    before = expert.clone(), amateur.clone()
    out = contrast(expert, amateur, alpha=0.1, weight=0.0, formulation="li")
    assert out.dtype == torch.float32 and out.data_ptr() != expert.data_ptr()
    assert torch.equal(expert, before[0]) and torch.equal(amateur, before[1])


def test_forbidden_eos_promotion_keeps_eos_only_where_the_expert_ranks_it_first():
    # Row 0: the expert prefers id 0 (p .5) over EOS = id 2 (p .2); the amateur gives EOS almost nothing, so the
    # papers' rule promotes EOS (log(.2/.01) = 3.00 > 0). Row 1: EOS is the expert's first choice: it stays.
    expert = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], dtype=torch.float64))
    amateur = torch.log(torch.tensor([[0.5, 0.49, 0.01], [0.5, 0.49, 0.01]], dtype=torch.float64))
    papers = contrast(expert, amateur, alpha=0.1, weight=1.0, formulation="li")
    assert papers.argmax(-1).tolist() == [2, 2]
    got = ContrastSettings.for_cd(formulation="li", alpha=0.1).forbidding_promotion_of([2]).apply(expert, amateur)
    expected = [[0.0, LOG(0.3 / 0.49), -INF], [LOG(0.2 / 0.5), LOG(0.3 / 0.49), LOG(0.5 / 0.01)]]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert got.argmax(-1).tolist() == [0, 2]
    # Ids outside the contrasted range are ignored; bad ids are refused.
    far = ContrastSettings.for_cd(formulation="li").forbidding_promotion_of([99]).apply(expert, amateur)
    torch.testing.assert_close(far, papers)
    with pytest.raises(ValueError, match="special_ids must be non-negative"):
        ContrastSettings.for_cd().forbidding_promotion_of([-1])


def test_eos_promotion_setting_reaches_the_processors_through_the_registry(tiny_llama, tiny_tokenizer):
    batch = tiny_tokenizer(["The quick brown fox"], return_tensors="pt")
    early = EarlyExitAmateur(tiny_llama, 2)
    forbid = ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer, amateur=early, eos_promotion="forbid")
    allow = ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer, amateur=early, eos_promotion="allow")
    default = ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer, amateur=early)
    assert forbid.generate_kwargs(batch)["logits_processor"][0].settings.special_ids == (testing.EOS_ID,)
    assert default.hyperparameters["eos_promotion"] == "forbid"  # the measured default (EOS-first 50% -> 5%)
    assert allow.generate_kwargs(batch)["logits_processor"][0].settings.special_ids == ()
    cid = ContrastiveInputMethod(tiny_llama, tiny_tokenizer, eos_promotion="forbid")
    assert cid.generate_kwargs(batch, batch)["logits_processor"][0].settings.special_ids == (testing.EOS_ID,)
    with pytest.raises(ValueError, match="eos_promotion must be one of"):
        ContrastiveDecodingMethod(tiny_llama, tiny_tokenizer, amateur=early, eos_promotion="never")


# ---------------------------------------------------------------------------------------------- settings
def test_settings_weight_rule_and_defaults():
    assert ContrastSettings.for_cd() == ContrastSettings("li", 0.1, 1.0, 1.0)  # the open-ended winner
    assert ContrastSettings.for_cd(formulation="obrien-lewis") == ContrastSettings("obrien-lewis", 0.1, 0.5, 1.0)
    assert ContrastSettings.for_cd(formulation="li", beta=4.0).weight == 1.0  # Li et al.: weight 1, no beta
    assert ContrastSettings.for_cid(cid_lambda=2.0) == ContrastSettings("li", 0.1, 2.0, 1.0)
    from_names = ContrastSettings.from_hyperparameters(
        "cd", {"beta": 0.8, "cd_formulation": "obrien-lewis", "num_beams": 3}
    )
    assert from_names == ContrastSettings("obrien-lewis", 0.1, 0.8, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=math.inf), "beta must be a finite number"),
        (dict(beta=math.nan), "beta must be a finite number"),
        (dict(beta=-0.1), "beta must be >= 0"),
        (dict(beta=True), "beta must be a number"),
        (dict(beta="0.5"), "beta must be a number"),
        (dict(alpha=0.0), r"alpha .* must be in \(0, 1\]"),
        (dict(alpha=math.nan), "alpha"),
        (dict(amateur_temperature=math.inf), "amateur_temperature must be a finite number"),
        (dict(amateur_temperature=0.0), "amateur_temperature must be > 0"),
        (dict(formulation="typo"), "unknown contrastive decoding formulation 'typo'"),
    ],
)
def test_settings_reject_bad_values_with_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastSettings.for_cd(**kwargs)


def test_cid_lambda_inf_and_unknown_method_are_rejected():
    with pytest.raises(ValueError, match="cid_lambda.*finite"):
        ContrastSettings.for_cid(cid_lambda=math.inf)
    with pytest.raises(ValueError, match="'cd' and 'cid', not 'cs'"):
        ContrastSettings.from_hyperparameters("cs", {})


def test_equal_settings_are_one_rule():
    """The vLLM core groups rows by rule (a dict key): equal settings must hash alike and never change."""
    rows = {ContrastSettings.for_cd(): [0]}
    rows.setdefault(ContrastSettings.for_cd(), []).append(1)
    rows.setdefault(ContrastSettings.for_cd().forbidding_promotion_of((2,)), []).append(2)
    assert list(rows.values()) == [[0, 1], [2]]
    with pytest.raises(AttributeError):
        ContrastSettings.for_cd().alpha = 0.2


# ---------------------------------------------------------------------------------------------- processors
class _Snapshot:
    """A processor that records the scores tensor it is given (identity and values) and passes it on."""

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, scores):
        self.seen.append((scores, scores.clone()))
        return scores


@pytest.mark.parametrize("mode", ["greedy", "beams", "sample"])
@pytest.mark.parametrize("kind", ["cd-separate", "cd-early-exit", "cid", "cid-lambda0"])
def test_processors_never_modify_scores_in_place(kind, mode, tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    batch = tiny_tokenizer(["The quick brown fox", "Question: how"], return_tensors="pt", padding=True)
    if kind == "cd-separate":
        processor = ContrastiveDecodingLogitsProcessor(
            testing.tiny_llama(seed=1), attention_mask=batch["attention_mask"]
        )
    elif kind == "cd-early-exit":
        processor = EarlyExitContrastiveLogitsProcessor(EarlyExitAmateur(expert, 2))
    else:
        lam = 0.0 if kind == "cid-lambda0" else 1.0
        processor = ContrastiveInputLogitsProcessor(
            expert, batch["input_ids"], batch["attention_mask"], cid_lambda=lam
        )
    snapshot = _Snapshot()
    kwargs = {"greedy": {}, "beams": {"num_beams": 2}, "sample": {"do_sample": True, "top_k": 0}}[mode]
    expert.generate(**batch, max_new_tokens=4, logits_processor=LogitsProcessorList([snapshot, processor]), **kwargs)
    assert len(snapshot.seen) == 4
    for tensor, copy in snapshot.seen:
        assert torch.equal(tensor, copy)


def test_continuous_batching_never_runs_the_stateful_processors():
    """Their state follows batch rows; transformers' continuous batching reshuffles rows, so it must drop them
    (it keeps processors whose support is unknown, which would contrast the wrong rows)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )

    stateful = (
        ContrastiveDecodingLogitsProcessor,
        EarlyExitContrastiveLogitsProcessor,
        ContrastiveInputLogitsProcessor,
    )
    given = LogitsProcessorList([object.__new__(cls) for cls in stateful] + [TemperatureLogitsWarper(0.7)])
    kept = ContinuousBatchingLogitsProcessorList(given).logits_processor
    assert [type(p) for p in kept] == [TemperatureLogitsWarper]


# ---------------------------------------------------------------------------------------------- early-exit spec
def test_one_early_exit_parser():
    assert parse_early_exit("early-exit:8") == 8 and parse_early_exit(early_exit_spec(3)) == 3
    assert parse_early_exit("smollm2-135m-instruct") is None
    for bad in ("early-exit:", "early-exit:x", "early-exit:-1", "early-exit:2.5", "early-exit:\u0663"):
        with pytest.raises(ValueError, match="'early-exit:N' with an integer N"):
            parse_early_exit(bad)


# ---------------------------------------------------------------------------------------------- LM head
def _tiny(config_class, model_class, seed: int, **scaling):
    """A 4-layer model of another architecture, built like ``cdlm.testing``'s (peaked random weights)."""
    config = config_class(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.25,
        pad_token_id=testing.PAD_ID,
        bos_token_id=testing.BOS_ID,
        eos_token_id=testing.EOS_ID,
        **scaling,
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def _tiny_cohere(logit_scale: float) -> CohereForCausalLM:
    return _tiny(CohereConfig, CohereForCausalLM, 3, logit_scale=logit_scale)  # forward: logits * logit_scale


def _tiny_granite(logits_scaling: float) -> GraniteForCausalLM:
    return _tiny(GraniteConfig, GraniteForCausalLM, 4, logits_scaling=logits_scaling)  # forward: logits / scaling


def _tiny_gemma3_softcapped() -> torch.nn.Module:
    model = testing.tiny_gemma3(seed=0)
    model.config.final_logit_softcapping = 2.0  # small enough to bend the tiny model's logits
    return model


MODELS = {
    "llama": lambda: testing.tiny_llama(seed=0),
    "gemma3-softcap": _tiny_gemma3_softcapped,
    "cohere-logit-scale": lambda: _tiny_cohere(0.25),
    "granite-logits-scaling": lambda: _tiny_granite(4.0),
}


@pytest.mark.parametrize("name", MODELS)
def test_head_logits_equal_the_models_own_forward(name, tiny_tokenizer):
    model = MODELS[name]()
    batch = tiny_tokenizer(["The quick brown fox"], return_tensors="pt")
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        expected = model(**batch).logits
        torch.testing.assert_close(head_logits(model, hidden), expected, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([5, 2, 300])
        torch.testing.assert_close(head_logits(model, hidden, ids), expected[..., ids], rtol=1e-5, atol=1e-5)
    transform = LogitTransform.from_model(model)
    assert transform.multiplier == {"cohere-logit-scale": 0.25, "granite-logits-scaling": 0.25}.get(name, 1.0)
    assert (transform.softcap is not None) == (name == "gemma3-softcap")


def test_early_exit_amateur_applies_logit_scale(tiny_tokenizer):
    """Cohere multiplies logits by logit_scale: the early-exit amateur read off the expert's pass must too
    (before the shared head it ignored it, so CD and eval used amateur logits 4x too large here)."""
    expert = _tiny_cohere(0.25)
    amateur = EarlyExitAmateur(expert, 2)
    batch = tiny_tokenizer(["The quick brown fox"], return_tensors="pt")
    with torch.no_grad(), amateur.capture() as captured:
        expert(**batch)
        standalone = amateur.model(**batch).logits
    torch.testing.assert_close(amateur.logits_from_hidden(captured[0]), standalone, rtol=1e-5, atol=1e-5)
    # ... and early-exit CD equals CD with the shell run as a separate model, token for token.
    prompts = tiny_tokenizer(["The quick brown fox", "Question: how"], return_tensors="pt", padding=True)
    outputs = []
    for processor in (
        EarlyExitContrastiveLogitsProcessor(amateur, formulation="li"),
        ContrastiveDecodingLogitsProcessor(amateur.model, formulation="li", attention_mask=prompts["attention_mask"]),
    ):
        outputs.append(
            expert.generate(
                **prompts, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([processor])
            )
        )
    assert torch.equal(outputs[0], outputs[1])


def test_unknown_logit_scaling_is_refused():
    model = testing.tiny_llama(seed=0)
    model.config.logit_scale = 2.0  # a Llama config does not use it: cdlm cannot know what it means
    with pytest.raises(ValueError, match="logit_scale=2.0.*does not know"):
        LogitTransform.from_model(model)


def test_chunked_equals_one_pass_in_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(11, 5)
    labels = torch.randint(0, 11, (7,))
    transform = LogitTransform(multiplier=0.5, softcap=3.0)

    def per_row(h, y):
        logp = torch.log_softmax(transform(h @ weight.T), -1)
        return (logp.gather(-1, y[:, None]).squeeze(-1), logp.exp().max(-1).values)

    full = per_row(hidden, labels)
    (full[0].sum() + full[1].sum()).backward()
    expected_grad = hidden.grad.clone()
    for chunk_size, recompute in ((3, True), (2, False), (100, True)):
        hidden.grad = None
        parts = chunked(per_row, hidden, labels, chunk_size=chunk_size, recompute=recompute)
        torch.testing.assert_close(parts[0], full[0])
        torch.testing.assert_close(parts[1], full[1])
        (parts[0].sum() + parts[1].sum()).backward()
        torch.testing.assert_close(hidden.grad, expected_grad)
    empty = chunked(per_row, hidden[:0], labels[:0], chunk_size=4)
    assert [t.shape for t in empty] == [torch.Size([0]), torch.Size([0])]
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        chunked(per_row, hidden, labels, chunk_size=0)


# ---------------------------------------------------------------------------------------------- prompts
def test_eos_ids_from_model_generation_config_and_tokenizer(tiny_tokenizer):
    model = testing.tiny_llama(seed=0)
    assert eos_token_ids(model, tiny_tokenizer) == [testing.EOS_ID]
    assert eos_token_ids(GenerationConfig(eos_token_id=[7, 3]), tiny_tokenizer) == [testing.EOS_ID, 3, 7]
    assert eos_token_ids(None, tiny_tokenizer) == [testing.EOS_ID]


def test_render_prompts_uses_the_template_only_when_asked_and_present(tiny_tokenizer):
    assert render_prompts(tiny_tokenizer, ["hi"]) == ["<s>user: hi</s><s>assistant:"]
    assert render_prompts(tiny_tokenizer, ["hi"], use_chat_template=False) == ["hi"]
    assert not adds_special_tokens(tiny_tokenizer) and adds_special_tokens(tiny_tokenizer, False)
    no_template = testing.tiny_tokenizer()
    no_template.chat_template = None
    assert render_prompts(no_template, ["hi"]) == ["hi"] and adds_special_tokens(no_template)


def test_prompt_longer_than_the_context_is_refused():
    model = testing.tiny_llama(seed=0)
    assert context_length(model) == 512
    check_fits_context(model, [500], 12)  # exactly 512 positions: fine
    with pytest.raises(ValueError, match="prompt 1 has 501 tokens.*513 positions.*context of 512"):
        check_fits_context(model, [3, 501], 12)
    with pytest.raises(ValueError, match="contrastive prompt 4 is empty"):
        check_fits_context(model, [0], 12, what="contrastive prompt", first_index=4)


# ---------------------------------------------------------------------------------------------- docstrings
@pytest.mark.parametrize("module", [contrast_module, amateur_module, cd_module, cid_module])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
