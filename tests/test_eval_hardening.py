"""Issue 15 (eval parts) and 13.4: the run signature covers what determines results, validation happens before
anything is written, bad files are named with their line, chat templates, lm-eval's results layout, and the
task / scoring-rule interfaces that keep ``evaluate`` free of task and method names."""

from __future__ import annotations

import gzip
import json
from functools import partial

import pytest

from cdlm import testing
from cdlm.cli import main as cli_main
from cdlm.decoding.methods import get_method
from cdlm.eval_harness import EvalConfig, evaluate
from cdlm.eval_harness.data import MalformedRowError, read_jsonl
from cdlm.eval_harness.task import (
    _TASKS,
    GENERATE_UNTIL,
    GenerationRequest,
    ScoringRule,
    Task,
    TaskData,
    fingerprint_rows,
    register_task,
)
from cdlm.models import EarlyExitAmateur, load_model

HELLASWAG_ROWS = [
    {
        "activity_label": "Cooking",
        "ctx_a": "A man cuts onions.",
        "ctx_b": "he",
        "endings": ["fries them.", "sings.", "is a boat.", "eats."],
        "label": 0,
    },
    {
        "activity_label": "Running",
        "ctx_a": "A woman runs.",
        "ctx_b": "",
        "endings": ["She stops.", "flies.", "The track is blue.", "runs."],
        "label": 3,
    },
]
GSM8K_ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 4)]
QUIET = {"progress": lambda message: None}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _greedy(loaded):
    return get_method("greedy")(loaded.model, loaded.tokenizer)


# --- 15.1 / 15.2: the resume signature covers data contents, weights, dtype, method, task version ---------------


def test_resume_refuses_changed_data_contents_at_the_same_path(loaded, tmp_path):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    config = EvalConfig(task="hellaswag", data=str(data))
    evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)
    changed = [dict(HELLASWAG_ROWS[0], label=1), HELLASWAG_ROWS[1]]
    _write(data, changed)
    with pytest.raises(ValueError, match=r"other settings \(data\.data: sha256:"):
        evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)


def test_resume_refuses_changed_fewshot_data(loaded, tmp_path):
    test = _write(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    train = _write(tmp_path / "train.jsonl", GSM8K_ROWS)
    config = EvalConfig(
        task="gsm8k", data=str(test), fewshot_data=str(train), num_fewshot=1, max_new_tokens=2, limit=1
    )
    evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)
    _write(train, GSM8K_ROWS[::-1])
    with pytest.raises(ValueError, match=r"data\.fewshot_data"):
        evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)


def test_resume_refuses_another_dtype(tiny_folder, loaded, tmp_path):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    config = EvalConfig(task="hellaswag", data=str(data))
    evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)
    bf16 = load_model(str(tiny_folder), dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match=r"model\.dtype: float32 -> bfloat16"):
        evaluate(bf16, _greedy(bf16), config, tmp_path / "run", **QUIET)


def test_resume_refuses_other_weights_under_the_same_reference(loaded, tmp_path):
    """A folder re-saved with another checkpoint has the same path (reference) but other weights."""
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    folder = tmp_path / "model"
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    first = load_model(str(folder), dtype="float32", device="cpu")
    config = EvalConfig(task="hellaswag", data=str(data))
    evaluate(first, _greedy(first), config, tmp_path / "run", **QUIET)
    testing.tiny_llama(seed=1).save_pretrained(folder)
    second = load_model(str(folder), dtype="float32", device="cpu")
    assert second.reference == first.reference
    with pytest.raises(ValueError, match=r"model\.weights"):
        evaluate(second, _greedy(second), config, tmp_path / "run", **QUIET)


def test_resume_refuses_changed_hyperparameters_and_task_version(loaded, tmp_path, monkeypatch):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    config = EvalConfig(task="hellaswag", data=str(data))
    amateur = EarlyExitAmateur(loaded.model, 1)
    cd = partial(get_method("cd"), cd_formulation="obrien-lewis")  # the form whose weight beta is
    evaluate(loaded, cd(loaded.model, loaded.tokenizer, amateur=amateur, beta=0.5), config, tmp_path / "run", **QUIET)
    with pytest.raises(ValueError, match=r"method\.beta: 0\.5 -> 0\.25"):
        evaluate(
            loaded, cd(loaded.model, loaded.tokenizer, amateur=amateur, beta=0.25), config, tmp_path / "run", **QUIET
        )
    from cdlm.eval_harness.tasks.hellaswag import HellaSwagTask

    monkeypatch.setattr(HellaSwagTask, "version", "99.0")
    with pytest.raises(ValueError, match=r"task\.version: 1\.0 -> 99\.0"):
        evaluate(
            loaded, cd(loaded.model, loaded.tokenizer, amateur=amateur, beta=0.5), config, tmp_path / "run", **QUIET
        )


def test_results_record_task_version_and_data_fingerprint(loaded, tmp_path):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    result = evaluate(loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(data)), tmp_path / "run", **QUIET)
    assert result["task_version"] == "1.0"
    assert result["config"]["data_fingerprints"] == {"data": fingerprint_rows(HELLASWAG_ROWS)}
    signature = json.loads((tmp_path / "run" / "run.json").read_text())
    assert signature["model"]["dtype"] == "float32" and signature["model"]["device"] == "cpu"
    assert signature["model"]["weights"].startswith("sha256:")


# --- 15.7: validate everything before writing anything -----------------------------------------------------


@pytest.mark.parametrize(
    "shots, message", [("-2", "num_fewshot must be >= 0"), ("4", "larger than the 3 few-shot rows")]
)
def test_failed_validation_leaves_no_run_folder_and_the_fixed_command_runs(
    tiny_folder, tmp_path, capsys, shots, message
):
    data = _write(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    out = tmp_path / "run"
    base = [
        "eval",
        "--task",
        "gsm8k",
        "--model",
        str(tiny_folder),
        "--data",
        str(data),
        "--fewshot-data",
        str(data),
        "--max-new-tokens",
        "2",
        "--output-dir",
        str(out),
    ]
    assert cli_main(base + ["--num-fewshot", shots]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(base + ["--num-fewshot", "1"]) == 0
    assert (out / "results.json").exists() and (out / "results_lm_eval.json").exists()


def test_hellaswag_fewshot_larger_than_the_pool_is_a_clear_error(loaded, tmp_path):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    with pytest.raises(ValueError, match="num_fewshot=2 needs at least 3 rows to draw from, the pool has 2"):
        evaluate(
            loaded,
            _greedy(loaded),
            EvalConfig(task="hellaswag", data=str(data), num_fewshot=2),
            tmp_path / "run",
            **QUIET,
        )
    assert not (tmp_path / "run").exists()


# --- 15.10: unclear errors -----------------------------------------------------------------------------------


def test_hellaswag_label_that_is_not_an_integer_names_file_and_line(loaded, tmp_path):
    data = _write(tmp_path / "hs.jsonl", [HELLASWAG_ROWS[0], dict(HELLASWAG_ROWS[1], label="three")])
    with pytest.raises(MalformedRowError, match=r"hs\.jsonl:2 field 'label' should be an integer label, got 'three'"):
        evaluate(loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(data)), tmp_path / "run", **QUIET)


def test_row_errors_name_the_file_line_even_after_blank_lines(loaded, tmp_path):
    """Messages name the line a user can open, not a 0-based row index (blank lines are skipped by the reader)."""
    data = tmp_path / "gaps.jsonl"
    bad = dict(HELLASWAG_ROWS[1])
    del bad["endings"]
    data.write_text("\n" + json.dumps(HELLASWAG_ROWS[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(MalformedRowError, match=r"gaps\.jsonl:4 has no field 'endings'"):
        evaluate(loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(data)), tmp_path / "run", **QUIET)


def test_samples_row_without_index_names_the_file_and_line(loaded, tmp_path):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    config = EvalConfig(task="hellaswag", data=str(data))
    evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)
    samples = tmp_path / "run" / "samples.jsonl"
    first, second = samples.read_text().splitlines()
    record = json.loads(second)
    del record["index"]
    samples.write_text(first + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl:2 has no integer 'index' field"):
        evaluate(loaded, _greedy(loaded), config, tmp_path / "run", **QUIET)


def test_non_utf8_and_malformed_json_lines_name_file_and_line(tmp_path):
    plain = tmp_path / "latin1.jsonl"
    plain.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(MalformedRowError, match=r"latin1\.jsonl:2 is not UTF-8 text"):
        read_jsonl(plain)
    packed = tmp_path / "broken.jsonl.gz"
    with gzip.open(packed, "wb") as handle:
        handle.write(b'{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(MalformedRowError, match=r"broken\.jsonl\.gz:4 is not valid JSON"):
        read_jsonl(packed)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"a": 1}\n')
    with pytest.raises(MalformedRowError, match=r"plain\.jsonl\.gz is not a readable gzip file"):
        read_jsonl(not_gzip)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_jsonl(tmp_path)


# --- 15.15: --apply-chat-template ----------------------------------------------------------------------------


def test_apply_chat_template_renders_prompts_and_drops_the_target_delimiter(loaded, tmp_path):
    from cdlm.eval_harness.scoring import encode_request, score_requests

    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    config = EvalConfig(task="hellaswag", data=str(data), apply_chat_template=True)
    evaluate(loaded, _greedy(loaded), config, tmp_path / "chat", **QUIET)
    record = json.loads((tmp_path / "chat" / "samples.jsonl").read_text().splitlines()[0])
    # lm-eval: the whole prompt is one user turn + generation prompt; choices follow with no delimiter.
    context = "<s>user: Cooking: A man cuts onions. He</s><s>assistant:"
    request = encode_request(loaded.tokenizer, context, HELLASWAG_ROWS[0]["endings"], add_special_tokens=False)
    expected, _ = score_requests(loaded.model, loaded.tokenizer, [request])
    # float32: the batch's shapes move the last bits
    assert record["expert_loglikelihoods"] == pytest.approx([s.loglikelihood for s in expected[0]], rel=1e-6)

    gsm = _write(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    config = EvalConfig(
        task="gsm8k", data=str(gsm), num_fewshot=0, max_new_tokens=2, limit=1, apply_chat_template=True
    )
    evaluate(loaded, _greedy(loaded), config, tmp_path / "gchat", **QUIET)
    record = json.loads((tmp_path / "gchat" / "samples.jsonl").read_text())
    assert record["prompt"] == "<s>user: Question: What is 1 + 1?\nAnswer:</s><s>assistant:"


def test_apply_chat_template_without_a_template_is_refused(tiny_folder, tmp_path):
    plain = load_model(str(tiny_folder), dtype="float32", device="cpu")
    plain.tokenizer.chat_template = None
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    config = EvalConfig(task="hellaswag", data=str(data), apply_chat_template=True)
    with pytest.raises(ValueError, match="no chat template"):
        evaluate(plain, _greedy(plain), config, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


# --- 15.14 (part): lm-eval's results layout ---------------------------------------------------------------------


def test_results_in_lm_eval_layout_are_read_by_lm_eval_style_keys(loaded, tmp_path):
    from cdlm.eval_harness.report import lm_eval_layout

    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    result = evaluate(loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(data)), tmp_path / "run", **QUIET)
    layout = lm_eval_layout(result)
    metrics = layout["results"]["hellaswag"]
    assert (
        metrics["acc,none"] == result["results"]["acc"] and metrics["acc_norm,none"] == result["results"]["acc_norm"]
    )
    assert metrics["acc_stderr,none"] == result["results"]["acc_stderr"]
    assert layout["versions"] == {"hellaswag": "1.0"} and layout["n-shot"] == {"hellaswag": 0}
    assert layout["higher_is_better"]["hellaswag"] == {"acc": True, "acc_norm": True}


# --- 13.4: a new task is one class; methods bring their scoring rule --------------------------------------------


class EchoTask(Task):
    """A toy generation task defined outside the package: the model must continue "x =" with " 1"."""

    name = "echo"
    version = "0.1"
    output_type = GENERATE_UNTIL
    metrics = ("starts_with_digit",)
    primary_metric = "starts_with_digit"

    def load(self, config):
        rows = [{"prompt": f"item {i} ="} for i in range(3)]
        return TaskData(rows[: config.limit], "inline", None, {"data": fingerprint_rows(rows)})

    def build_requests(self, data, config):
        return [GenerationRequest(doc["prompt"], until=("\n",), max_new_tokens=3) for doc in data.docs]

    def process_result(self, doc, request, response):
        return {"response": response.text, "starts_with_digit": float(response.text.strip()[:1].isdigit())}


def test_a_task_registered_from_outside_runs_through_evaluate(loaded, tmp_path):
    register_task("echo", EchoTask)
    try:
        result = evaluate(
            loaded, _greedy(loaded), EvalConfig(task="echo", max_new_tokens=50), tmp_path / "echo", **QUIET
        )
    finally:
        _TASKS.pop("echo")
    assert result["task"] == "echo" and result["task_version"] == "0.1" and result["n_samples"] == 3
    assert set(result["results"]) == {"starts_with_digit", "starts_with_digit_stderr"}
    assert all(
        r["num_tokens"] <= 3 for r in map(json.loads, (tmp_path / "echo" / "samples.jsonl").read_text().splitlines())
    )


def test_methods_supply_their_scoring_rules(loaded):
    amateur = EarlyExitAmateur(loaded.model, 1)
    cd = get_method("cd")(loaded.model, loaded.tokenizer, amateur=amateur, cd_formulation="obrien-lewis")
    from cdlm.decoding.contrast import DEFAULT_BETA, DEFAULT_CID_LAMBDA

    assert cd.scoring_rule() == ScoringRule("contrastive", contrast="amateur", weight=DEFAULT_BETA, amateur=amateur)
    assert cd.scoring_rule().amateur is amateur
    li = get_method("cd")(loaded.model, loaded.tokenizer, amateur=amateur)  # Li: the default formulation
    assert li.scoring_rule().weight == 1.0  # Li et al.'s rule subtracts the amateur with weight 1
    cid = get_method("cid")(loaded.model, loaded.tokenizer)
    assert cid.scoring_rule().contrast == "contrastive-input" and cid.scoring_rule().weight == DEFAULT_CID_LAMBDA
    assert _greedy(loaded).scoring_rule().contrast is None
    assert ScoringRule("x", contrast="amateur", weight=0.5, amateur=object()).combine([1.0, 2.0], [4.0, 2.0]) == [
        -1.0,
        1.0,
    ]


def test_task_options_reach_the_config_and_unknown_ones_are_refused(tiny_folder, tmp_path, capsys):
    data = _write(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    argv = [
        "eval",
        "--task",
        "hellaswag",
        "--model",
        str(tiny_folder),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "r"),
    ]
    assert cli_main(argv + ["--task-option", "domain=books"]) == 2
    assert "task 'hellaswag' has no option(s) domain; it takes none" in capsys.readouterr().err
    assert cli_main(argv + ["--task-option", "nokey"]) == 2
    assert "--task-option takes KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_hyperparameters_are_refused_before_the_model_loads(tmp_path, capsys):
    """The model reference does not exist: the hyperparameter error must come first, and nothing is written."""
    argv = [
        "eval",
        "--task",
        "hellaswag",
        "--model",
        str(tmp_path / "no-such-model"),
        "--method",
        "cd",
        "--beta",
        "-1",
        "--output-dir",
        str(tmp_path / "r"),
    ]
    assert cli_main(argv) == 2
    assert "beta must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
