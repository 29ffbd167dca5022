"""End-to-end eval runs on tiny models: results files, resume, atomic writes, CLI errors and smoke."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdlm.cli import main as cli_main
from cdlm.decoding.methods import get_method
from cdlm.eval_harness import EvalConfig, evaluate
from cdlm.models import EarlyExitAmateur
from cdlm.runs import atomic_write_json

HELLASWAG_ROWS = [
    {
        "activity_label": "Cooking",
        "ctx_a": "A man cuts onions.",
        "ctx_b": "he",
        "endings": ["fries them.", "sings loudly to the cat.", "is a boat.", "eats the knife."],
        "label": 0,
    },
    {
        "activity_label": "Running",
        "ctx_a": "A woman runs on a track.",
        "ctx_b": "",
        "endings": ["She stops.", "flies.", "The track is blue today.", "runs."],
        "label": 3,
    },
    {
        "activity_label": "Music",
        "ctx_a": "A boy plays the piano.",
        "ctx_b": "the boy",
        "endings": ["stops playing.", "a", "is playing the drums.", "[title] bows."],
        "label": 2,
    },
]
GSM8K_ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 4)]


@pytest.fixture
def data_files(tmp_path):
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_ROWS))
    gs = tmp_path / "gsm.jsonl"
    gs.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return hs, gs


def _greedy(loaded):
    return get_method("greedy")(loaded.model, loaded.tokenizer)


def test_hellaswag_results_and_resume(loaded, data_files, tmp_path):
    hs, _ = data_files
    out = tmp_path / "run"
    config = EvalConfig(task="hellaswag", data=str(hs), batch_size=2)
    full = evaluate(loaded, _greedy(loaded), config, out, progress=lambda m: None)
    assert full["n_samples"] == 3 and set(full["results"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert full["versions"]["transformers"] and full["method"]["method"] == "greedy"
    assert json.loads((out / "results.json").read_text())["results"] == full["results"]
    lines = (out / "samples.jsonl").read_text().splitlines()
    # Simulate an interruption after one finished example plus a torn line, then rerun.
    (out / "samples.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    messages = []
    resumed = evaluate(loaded, _greedy(loaded), config, out, progress=messages.append)
    assert any("resuming: 1/3" in m for m in messages)
    assert resumed["timing"]["examples_this_run"] == 2
    assert resumed["results"] == pytest.approx(full["results"], nan_ok=True)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3


def test_changed_configuration_in_the_same_folder_is_refused(loaded, data_files, tmp_path):
    hs, _ = data_files
    evaluate(
        loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(hs)), tmp_path / "r", progress=lambda m: None
    )
    with pytest.raises(ValueError, match="other settings.*num_fewshot"):
        evaluate(
            loaded,
            _greedy(loaded),
            EvalConfig(task="hellaswag", data=str(hs), num_fewshot=1),
            tmp_path / "r",
            progress=lambda m: None,
        )


def test_contrastive_scoring_uses_expert_minus_beta_amateur(loaded, data_files, tmp_path):
    hs, _ = data_files

    method = get_method("cd")(
        loaded.model,
        loaded.tokenizer,
        amateur=EarlyExitAmateur(loaded.model, 2),
        beta=0.5,
        cd_formulation="obrien-lewis",
    )
    result = evaluate(
        loaded, method, EvalConfig(task="hellaswag", data=str(hs)), tmp_path / "cd", progress=lambda m: None
    )
    assert result["scoring"]["scoring"] == "contrastive"
    for line in (tmp_path / "cd" / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        for s, e, a in zip(record["scores"], record["expert_loglikelihoods"], record["contrast_loglikelihoods"]):
            assert s == pytest.approx(e - 0.5 * a)


def test_gsm8k_generation_records_outputs(loaded, data_files, tmp_path):
    _, gs = data_files
    config = EvalConfig(
        task="gsm8k", data=str(gs), fewshot_data=str(gs), num_fewshot=2, max_new_tokens=4, batch_size=2
    )
    result = evaluate(loaded, _greedy(loaded), config, tmp_path / "g", progress=lambda m: None)
    assert result["n_samples"] == 3 and "exact_match,strict-match" in result["results"]
    record = json.loads((tmp_path / "g" / "samples.jsonl").read_text().splitlines()[0])
    assert record["prompt"].endswith("Question: What is 1 + 1?\nAnswer:") and record["target"].endswith("#### 2")
    assert record["num_tokens"] <= 4


def test_gsm8k_generates_through_another_backend_and_records_it(loaded, data_files, tmp_path):
    """A backend with the runner's signature (the vLLM one in practice) produces the outputs, its name
    lands in the results, and a run started on one backend is not resumed on another."""
    from cdlm.decoding.runner import generate

    _, gs = data_files
    calls = []

    def fake_backend(model, tokenizer, prompts, method, **kwargs):
        calls.append(len(prompts))
        return generate(model, tokenizer, prompts, method, **kwargs)

    fake_backend.backend = "fake"
    config = EvalConfig(
        task="gsm8k", data=str(gs), fewshot_data=str(gs), num_fewshot=1, max_new_tokens=3, batch_size=2
    )
    through_fake = evaluate(
        loaded, _greedy(loaded), config, tmp_path / "fake", generate_fn=fake_backend, progress=lambda m: None
    )
    assert calls == [2, 1] and through_fake["backend"] == "fake"
    direct = evaluate(loaded, _greedy(loaded), config, tmp_path / "direct", progress=lambda m: None)
    assert direct["backend"] == "transformers"
    fake_rows = [
        json.loads(line)["response"] for line in (tmp_path / "fake" / "samples.jsonl").read_text().splitlines()
    ]
    direct_rows = [
        json.loads(line)["response"] for line in (tmp_path / "direct" / "samples.jsonl").read_text().splitlines()
    ]
    assert fake_rows == direct_rows
    with pytest.raises(ValueError, match="other settings.*backend"):
        evaluate(loaded, _greedy(loaded), config, tmp_path / "fake", progress=lambda m: None)


def test_loglikelihood_task_refuses_a_generation_backend(loaded, data_files, tmp_path):
    hs, _ = data_files

    def backend(*args, **kwargs):
        raise AssertionError("must not be called")

    backend.backend = "vllm"
    with pytest.raises(ValueError, match="task 'hellaswag' is scored by log-likelihood"):
        evaluate(
            loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(hs)), tmp_path / "h", generate_fn=backend
        )
    assert cli_main(["eval", "--task", "hellaswag", "--backend", "vllm"]) == 2


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        _fail(path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _fail(path):
    from cdlm import runs

    original = runs.os.replace
    runs.os.replace = lambda *a: (_ for _ in ()).throw(TypeError("boom"))
    try:
        runs.atomic_write_json(path, {"a": 2})
    finally:
        runs.os.replace = original


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        EvalConfig(task="mmlu")
    with pytest.raises(ValueError, match="limit must be a positive"):
        EvalConfig(task="gsm8k", limit=0)


def test_cli_eval_and_compare_smoke(tiny_folder, data_files, tmp_path, capsys):
    hs, gs = data_files
    code = cli_main(
        [
            "eval",
            "--task",
            "hellaswag",
            "--model",
            str(tiny_folder),
            "--data",
            str(hs),
            "--output-dir",
            str(tmp_path / "e"),
        ]
    )
    assert code == 0 and "acc_norm" in capsys.readouterr().out
    code = cli_main(
        [
            "compare",
            "--task",
            "gsm8k",
            "--method",
            "greedy",
            "--method",
            "sample",
            "--model",
            str(tiny_folder),
            "--data",
            str(gs),
            "--fewshot-data",
            str(gs),
            "--num-fewshot",
            "1",
            "--max-new-tokens",
            "3",
            "--output-dir",
            str(tmp_path / "c"),
        ]
    )
    assert code == 0
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| gsm8k | greedy |" in table and "| gsm8k | sample |" in table
    assert (tmp_path / "c" / "greedy" / "samples.jsonl").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--task", "mmlu"], "unknown task 'mmlu'"),
        (["eval", "--task", "gsm8k", "--method", "beam"], "unknown decoding method 'beam'"),
        (["eval", "--task", "gsm8k", "--limit", "0"], "--limit must be a positive"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, message, capsys):
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_malformed_rows(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    assert (
        cli_main(
            [
                "eval",
                "--task",
                "gsm8k",
                "--model",
                str(tiny_folder),
                "--data",
                str(bad),
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "bad.jsonl:1 has no field 'answer'" in capsys.readouterr().err


def test_contrastive_input_scoring_contrasts_with_the_activity_label(loaded, data_files, tmp_path):
    hs, _ = data_files

    from cdlm.eval_harness.scoring import encode_request, score_requests

    method = get_method("cid")(loaded.model, loaded.tokenizer, cid_lambda=1.0)
    result = evaluate(
        loaded, method, EvalConfig(task="hellaswag", data=str(hs)), tmp_path / "cid", progress=lambda m: None
    )
    assert result["scoring"]["scoring"] == "contrastive-input"
    record = json.loads((tmp_path / "cid" / "samples.jsonl").read_text().splitlines()[0])
    request = encode_request(
        loaded.tokenizer,
        "Cooking:",
        [" " + e for e in ["fries them.", "sings loudly to the cat.", "is a boat.", "eats the knife."]],
    )
    label_only, _ = score_requests(loaded.model, loaded.tokenizer, [request])
    assert record["contrast_loglikelihoods"] == pytest.approx([s.loglikelihood for s in label_only[0]], abs=1e-4)
    assert record["scores"] == pytest.approx(
        [e - c for e, c in zip(record["expert_loglikelihoods"], record["contrast_loglikelihoods"])]
    )


GSM8K_FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_gsm8k_smollm2.json"


@pytest.mark.real_model
def test_smollm2_gsm8k_prompts_and_greedy_outputs_match_stored_lm_eval_ones(smollm2):
    """lm-eval 0.4.13's 5-shot prompts and greedy responses (benchmarks/lm_eval_agreement.py --write-fixture)
    are reproduced exactly: same exemplar draw, same stop handling, same text, same score."""
    from cdlm.decoding.runner import generate
    from cdlm.eval_harness.data import packaged_path, read_jsonl
    from cdlm.eval_harness.tasks import gsm8k as task

    problems = json.loads(GSM8K_FIXTURE.read_text())["problems"]
    rows = read_jsonl(packaged_path("gsm8k/test"))[: len(problems)]
    prompts = task.build_prompts(task.GSM8K, rows, read_jsonl(packaged_path("gsm8k/train")))
    assert prompts == [p["prompt"] for p in problems]
    stop = [*task.GSM8K.until, smollm2.tokenizer.eos_token]
    generations, _ = generate(
        smollm2.model,
        smollm2.tokenizer,
        prompts,
        _greedy(smollm2),
        max_new_tokens=256,
        batch_size=len(prompts),
        stop=stop,
    )
    assert [g.text for g in generations] == [p["lm_eval_response"] for p in problems]
    scores = [task.score(task.GSM8K, g.text, row)["exact_match,strict-match"] for g, row in zip(generations, rows)]
    assert scores == [p["strict_match"] for p in problems]
