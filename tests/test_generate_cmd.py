"""``cdlm generate`` input checks (issue 15 items 6, 8, 11): each bad input is one clear line, exit code 2."""

from __future__ import annotations

import pytest

from cdlm import testing
from cdlm.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate_tiny")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # progress lines (model loading) may precede the error
    assert last.startswith("cdlm generate: error: ")
    return last


def test_empty_prompts_file_is_an_error_not_the_demo_prompts(capsys, tiny_model_dir, tmp_path):
    for content in ("", "\n  \n\n"):
        empty = tmp_path / "prompts.txt"
        empty.write_text(content)
        err = _error(capsys, ["generate", "--model", tiny_model_dir, "--prompts-file", str(empty)])
        assert "has no prompts" in err and str(empty) in err


def test_prompts_file_that_is_a_directory_or_missing_or_not_utf8(capsys, tiny_model_dir, tmp_path):
    assert "is a directory" in _error(capsys, ["generate", "--model", tiny_model_dir, "--prompts-file", str(tmp_path)])
    missing = str(tmp_path / "nope.txt")
    assert "does not exist" in _error(capsys, ["generate", "--model", tiny_model_dir, "--prompts-file", missing])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8" in _error(capsys, ["generate", "--model", tiny_model_dir, "--prompts-file", str(latin1)])


def test_prompts_file_lines_are_the_prompts(capsys, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick\n\nQuestion: how\n")
    assert (
        main(
            ["generate", "--model", tiny_model_dir, "--prompts-file", str(prompts), "--max-new-tokens", "2", "--json"]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split('"prompt": ')[1].split('"')[1] for line in lines] == ["The quick", "Question: how"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "cd", "--beta", "inf"], "beta must be a finite number"),
        (["--method", "cd", "--beta", "nan"], "beta must be a finite number"),
        (["--method", "cd", "--amateur-temperature", "inf"], "amateur_temperature must be a finite number"),
        (["--method", "cid", "--cid-lambda", "inf"], "cid_lambda"),
        (["--method", "sample", "--temperature", "inf"], "temperature must be > 0 and finite"),
    ],
)
def test_non_finite_hyperparameters_are_refused_before_loading_the_model(capsys, flags, message):
    # The model does not exist: the hyperparameter error must come first, without loading anything.
    err = _error(capsys, ["generate", "--model", "/no/such/model", "--prompt", "hi", *flags])
    assert message in err


def test_prompt_longer_than_the_context_is_refused(capsys, tiny_model_dir):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 80  # far over 512 tokens
    err = _error(capsys, ["generate", "--model", tiny_model_dir, "--no-chat", "--prompt", long_prompt])
    assert "more than the model's context of 512" in err
