"""Hardening III-V (eval parts): line separators in records, contexts past the model's length, validation
before anything is written, batch size in sampling runs, compare end to end with plots, JSON lines,
settings-dependent default folders, the offline lm-eval tasks and ``cdlm-lm-eval`` without lm-eval."""

from __future__ import annotations

import json
import sys

import pytest

from cdlm import testing
from cdlm.cli import main as cli_main
from cdlm.decoding.methods import get_method
from cdlm.eval_harness import EvalConfig, evaluate
from cdlm.eval_harness.data import packaged_path, read_jsonl
from cdlm.runs import RunFolder

SEPARATORS = ["\u2028", "\u2029", "\u0085"]
HELLASWAG_ROW = {
    "activity_label": "Baking",
    "ctx_a": "A woman kneads dough.",
    "ctx_b": "she",
    "endings": ["shapes a loaf.", "swims.", "reads a map.", "paints it."],
    "label": 0,
}
GSM8K_ROWS = [
    {"question": f"How many is {i} and {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in (4, 5)
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _greedy(loaded):
    return get_method("greedy")(loaded.model, loaded.tokenizer)


# --- 27.9: one line reader: records with U+2028 / U+2029 / U+0085 stay one record ------------------------------


@pytest.mark.parametrize("separator", SEPARATORS)
def test_run_folder_records_with_line_separators_read_back_whole(tmp_path, separator):
    run = RunFolder.open(tmp_path / "run", {"x": 1})
    records = [{"index": 0, "text": f"one{separator}two"}, {"index": 1, "text": separator}]
    run.append(records)
    assert RunFolder.open(tmp_path / "run", {"x": 1}).finished() == {0: records[0], 1: records[1]}
    assert run.samples_path.read_bytes().count(b"\n") == 2


@pytest.mark.parametrize("separator", SEPARATORS)
def test_hellaswag_ending_with_a_separator_resumes_without_recomputing(loaded, tmp_path, separator):
    row = dict(HELLASWAG_ROW, endings=[f"shapes{separator}a loaf.", *HELLASWAG_ROW["endings"][1:]])
    data = _write(tmp_path / "hs.jsonl", [row, HELLASWAG_ROW])
    config = EvalConfig(task="hellaswag", data=str(data))
    first = evaluate(loaded, _greedy(loaded), config, tmp_path / "run", progress=lambda m: None)
    messages: list[str] = []
    second = evaluate(loaded, _greedy(loaded), config, tmp_path / "run", progress=messages.append)
    assert any("resuming: 2/2 examples already done" in m for m in messages)
    assert second["timing"]["examples_this_run"] == 0 and second["results"] == first["results"]


# --- 27.4 / 27.10: contexts past the model's length are refused before anything is written -----------------------


@pytest.mark.parametrize("naive", [False, True])
def test_hellaswag_context_past_the_model_length_is_refused_then_the_fixed_run_works(loaded, tmp_path, naive):
    long_row = dict(HELLASWAG_ROW, ctx_a="The dough rises and falls. " * 120)  # > 512 tokens (tiny model's context)
    data = _write(tmp_path / "hs.jsonl", [HELLASWAG_ROW, long_row])
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=r"hellaswag example 1: context \+ longest continuation is \d+ tokens, more "):
        evaluate(
            loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(data), shared_context=not naive), output
        )
    assert not output.exists()
    _write(data, [HELLASWAG_ROW, HELLASWAG_ROW])
    result = evaluate(
        loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(data), shared_context=not naive), output
    )
    assert result["n_samples"] == 2


def _eval_argv(tiny_folder, output, *extra):
    return ["eval", "--model", str(tiny_folder), "--output-dir", str(output), "--quiet", *extra]


def test_late_refusals_leave_nothing_and_the_corrected_command_runs(tiny_folder, tmp_path, capsys):
    gsm = _write(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    gsm_args = ["--task", "gsm8k", "--data", str(gsm), "--fewshot-data", str(gsm), "--num-fewshot", "0"]
    openended = ["--task", "openended", "--task-option", "split=dev", "--limit", "4", "--max-new-tokens", "3"]
    cases = [
        (
            [*gsm_args, "--max-new-tokens", "100000000"],
            "positions, more than the model's context of 512",
            [*gsm_args, "--max-new-tokens", "2"],
        ),
        (
            [*openended, "--task-option", "judge=no-such-judge-xyz"],
            "openended judge 'no-such-judge-xyz' is not a registered model",
            [*openended, "--task-option", "judge=none"],
        ),
        (
            [*openended, "--task-option", "judge=none", "--task-option", "mauve_seed=-3"],
            "mauve_seed must be in 0..4294967295, got -3",
            [*openended, "--task-option", "judge=none", "--task-option", "mauve_seed=3"],
        ),
        (
            [*gsm_args, "--max-new-tokens", "2", "--method", "dola", "--repetition-penalty", "nan"],
            "repetition_penalty must be a finite number > 0",
            [*gsm_args, "--max-new-tokens", "2", "--method", "dola", "--repetition-penalty", "1.1"],
        ),
    ]
    for number, (bad, message, good) in enumerate(cases):
        output = tmp_path / f"run{number}"
        capsys.readouterr()
        assert cli_main(_eval_argv(tiny_folder, output, *bad)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not output.exists()
        assert cli_main(_eval_argv(tiny_folder, output, *good)) == 0, capsys.readouterr().err
        assert (output / "results.json").exists()


def test_compare_openended_with_too_few_examples_for_mauve_fails_before_generating(tiny_folder, tmp_path, capsys):
    output = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_folder), "--output-dir", str(output), "--quiet", "--task", "openended"]
    argv += ["--task-option", "split=dev", "--limit", "3", "--method", "greedy", "--method", "sample"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "MAUVE needs at least 2 examples per domain, this run has books: 1" in err
    assert not output.exists()


# --- 27.17: a sampling run resumed with another batch size is refused (seeds follow the batches) ----------------


def test_generation_runs_sign_the_batch_size_and_scoring_runs_do_not(loaded, tmp_path):
    gsm = _write(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    sample = get_method("sample")(loaded.model, loaded.tokenizer, temperature=0.7)

    def gsm_config(batch_size):
        return EvalConfig(
            task="gsm8k", data=str(gsm), fewshot_data=str(gsm), num_fewshot=0, max_new_tokens=3, batch_size=batch_size
        )

    evaluate(loaded, sample, gsm_config(2), tmp_path / "gen", progress=lambda m: None)
    with pytest.raises(ValueError, match=r"config\.batch_size: 2 -> 1"):
        evaluate(loaded, sample, gsm_config(1), tmp_path / "gen", progress=lambda m: None)
    again = evaluate(loaded, sample, gsm_config(2), tmp_path / "gen", progress=lambda m: None)
    assert again["timing"]["examples_this_run"] == 0
    hs = _write(tmp_path / "hs.jsonl", [HELLASWAG_ROW, HELLASWAG_ROW])
    evaluate(loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(hs), batch_size=2), tmp_path / "ll")
    resumed = evaluate(
        loaded, _greedy(loaded), EvalConfig(task="hellaswag", data=str(hs), batch_size=1), tmp_path / "ll"
    )
    assert resumed["timing"]["examples_this_run"] == 0


# --- 26.1 / 22.11: reports skip text results, axes for degenerate data, compare end to end for every task --------


def test_report_rows_skip_text_results_and_degenerate_axes_get_the_unit_range():
    from cdlm.eval_harness.report import markdown_table, rows, y_limits

    result = {
        "task": "openended",
        "method": {"method": "greedy"},
        "results": {"mauve": 0.0, "mauve_stderr": 0.0, "judge": "tiny-judge", "n": 3},
        "n_samples": 3,
    }
    assert [r["metric"] for r in rows([result])] == ["mauve", "n"]
    assert "judge" not in markdown_table([result])
    assert y_limits([0.0, 0.0], [0.0, 0.0]) == (0.0, 1.0)
    assert y_limits([float("nan")], [0.0]) == (0.0, 1.0)
    assert y_limits([0.5, 0.25], [0.1, 0.0]) == (0.0, pytest.approx(0.72))
    assert y_limits([-1.0, 2.0], [0.0, 0.0]) == (pytest.approx(-1.2), pytest.approx(2.4))


@pytest.mark.parametrize("task", ["gsm8k", "gsm8k_cot", "hellaswag", "openended", "openended-judged"])
def test_compare_runs_every_task_end_to_end_with_a_plot(tiny_folder, tmp_path, capsys, task):
    pytest.importorskip("matplotlib")
    judge = "none"
    if task == "openended-judged":  # MAUVE, coherence and perplexity by a (tiny) judge model: "judge" is text
        pytest.importorskip("mauve")
        task, judge = "openended", str(tiny_folder)
    gsm = _write(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    hs = _write(tmp_path / "hs.jsonl", [HELLASWAG_ROW, dict(HELLASWAG_ROW, label=2)])
    data = {
        "gsm8k": ["--data", str(gsm), "--fewshot-data", str(gsm), "--num-fewshot", "1"],
        "gsm8k_cot": ["--data", str(gsm), "--num-fewshot", "1"],
        "hellaswag": ["--data", str(hs)],
        "openended": ["--task-option", "split=dev", "--task-option", f"judge={judge}", "--limit", "4"],
    }[task]
    output = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_folder), "--task", task, *data, "--max-new-tokens", "3"]
    argv += ["--method", "greedy", "--method", "sample", "--output-dir", str(output), "--quiet", "--json"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["method"]["method"] for line in lines] == ["greedy", "sample"]  # JSON lines
    assert (output / "compare.png").stat().st_size > 0
    table = (output / "compare.md").read_text()
    assert f"| {task} | greedy |" in table and "| judge |" not in table
    if judge != "none":
        assert "| openended | sample | mauve |" in table


# --- 26.9: eval --json prints one JSON line -------------------------------------------------------------------


def test_eval_json_is_one_json_line(tiny_folder, tmp_path, capsys):
    hs = _write(tmp_path / "hs.jsonl", [dict(HELLASWAG_ROW, endings=["a\u2028b", "c", "d", "e"])])
    argv = _eval_argv(tiny_folder, tmp_path / "e", "--task", "hellaswag", "--data", str(hs), "--json")
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["n_samples"] == 1


# --- 22.4: default output folders tell runs with other settings apart ------------------------------------------


def test_default_output_dirs_differ_by_settings_and_repeat_for_the_same_command(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    hs = _write(tmp_path / "hs.jsonl", [HELLASWAG_ROW])
    base = ["eval", "--model", str(tiny_folder), "--task", "hellaswag", "--data", str(hs), "--quiet"]
    cd = [*base, "--method", "cd", "--cd-formulation", "obrien-lewis"]
    for argv in (
        [*cd, "--amateur", "early-exit:1"],
        [*cd, "--amateur", "early-exit:2"],
        [*cd, "--amateur", "early-exit:1"],
    ):
        assert cli_main(argv) == 0, capsys.readouterr().err
    folders = sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir())
    assert len(folders) == 2 and all(name.startswith("hellaswag-cd-") for name in folders)


# --- 26.5 / 22.2: offline lm-eval tasks shipped in the package; cdlm-lm-eval without lm-eval ---------------------


def test_packaged_lm_eval_tasks_point_at_the_packaged_data(tmp_path):
    from cdlm.eval_harness.lm_eval_tasks import TASK_NAMES, write_task_dir

    folder = write_task_dir(tmp_path / "tasks")
    texts = {path.stem: path.read_text() for path in folder.glob("*.yaml")}
    assert sorted(texts) == sorted(TASK_NAMES)
    assert f"validation: {packaged_path('hellaswag/validation')}\n" in texts["cdlm_hellaswag"]
    assert f"train: {packaged_path('gsm8k/train')}\n" in texts["cdlm_gsm8k"]
    assert "__" not in "".join(texts.values())
    custom = write_task_dir(tmp_path / "custom", {"__DATA__": tmp_path / "mine.jsonl"})
    assert f"validation: {tmp_path / 'mine.jsonl'}\n" in (custom / "cdlm_hellaswag_processed.yaml").read_text()


def test_packaged_hellaswag_task_renders_docs_as_the_cdlm_task_does(tmp_path):
    import datasets

    from cdlm.eval_harness.lm_eval_tasks import write_task_dir
    from cdlm.eval_harness.tasks.hellaswag import process_rows

    folder = write_task_dir(tmp_path / "tasks")
    sys.path.insert(0, str(folder))
    try:
        import utils  # the module lm-eval loads for `!function utils.process_docs`
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("utils", None)
    rows = read_jsonl(packaged_path("hellaswag/validation"))[:5]
    dataset = datasets.Dataset.from_list(rows)
    rendered = utils.process_docs(dataset)
    expected = process_rows(rows, "x")
    assert [{k: d[k] for k in ("query", "choices", "gold")} for d in rendered] == expected


def test_lm_eval_command_adds_the_packaged_tasks_unless_given_its_own(tmp_path, monkeypatch):
    from cdlm.eval_harness.lm_eval_cli import lm_eval_argv

    monkeypatch.setenv("CDLM_CACHE", str(tmp_path))
    argv = lm_eval_argv(["--model", "cdlm", "--tasks", "cdlm_hellaswag"])
    assert argv[:4] == ["--model", "cdlm", "--tasks", "cdlm_hellaswag"] and argv[4] == "--include_path"
    assert (tmp_path / "lm_eval_tasks" / "cdlm_hellaswag.yaml").exists() and argv[5] == str(tmp_path / "lm_eval_tasks")
    assert lm_eval_argv(["--include_path", "mine"]) == ["--include_path", "mine"]


def test_lm_eval_command_without_lm_eval_is_one_line(monkeypatch, capsys):
    from cdlm.eval_harness.lm_eval_cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, as without the extra
    assert main(["--model", "cdlm", "--tasks", "cdlm_hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cdlm-lm-eval: error: lm-eval is not installed: pip install 'cdlm[lmeval]'"]


def test_cuda_device_falls_back_to_cpu_with_a_warning(monkeypatch):
    import torch

    from cdlm.eval_harness.lm_eval_tasks import available_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available: running on the CPU"):
        assert available_device("cuda:0") == "cpu"
    assert available_device(None) == "auto" and available_device("cpu") == "cpu"


def test_compare_checks_every_methods_run_folder_before_the_first_computes(tiny_folder, tmp_path, capsys):
    hs = _write(tmp_path / "hs.jsonl", [HELLASWAG_ROW])
    output = tmp_path / "cmp"
    base = ["compare", "--model", str(tiny_folder), "--task", "hellaswag", "--data", str(hs), "--quiet"]
    assert cli_main([*base, "--method", "cid", "--output-dir", str(output)]) == 0  # cid/ holds a run
    other = _write(tmp_path / "other.jsonl", [dict(HELLASWAG_ROW, label=1)])
    argv = ["compare", "--model", str(tiny_folder), "--task", "hellaswag", "--data", str(other), "--quiet"]
    capsys.readouterr()
    assert cli_main([*argv, "--method", "greedy", "--method", "cid", "--output-dir", str(output)]) == 2
    assert "cmp/cid holds a run with other settings (" in capsys.readouterr().err
    assert not (output / "greedy").exists()  # refused before greedy computed anything


def test_scored_length_is_context_plus_continuation_and_one_prefix_token_for_an_empty_context():
    from cdlm.eval_harness.scoring import check_fits_model, encode_request

    tokenizer = testing.tiny_tokenizer()
    model = testing.tiny_llama(seed=0)
    groups = [("A man cuts onions.", [" He fries them.", " No."]), ("", ["Just a text to score."])]
    fed = [
        len(request.context) + max(map(len, request.continuations))
        for request in (encode_request(tokenizer, context, conts) for context, conts in groups)
    ]
    for index, length in enumerate(fed):
        model.config.max_position_embeddings = length
        check_fits_model(model, tokenizer, [groups[index]])  # exactly full: fine
        model.config.max_position_embeddings = length - 1
        with pytest.raises(ValueError, match=rf"request 0: context \+ longest continuation is {length} tokens"):
            check_fits_model(model, tokenizer, [groups[index]])
