"""The `cdlm` command line: help, model listing, generation, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cdlm import testing
from cdlm.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_tiny")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"models", "generate"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: cdlm " + name in capsys.readouterr().out


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "cdlm.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("cdlm ")


def test_models_lists_registered_names(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out and "(default)" in out


def test_generate_greedy_json_is_deterministic(capsys, tiny_model_dir):
    args = [
        "generate",
        "--model",
        tiny_model_dir,
        "--prompt",
        "The quick",
        "--prompt",
        "Question: how",
        "--max-new-tokens",
        "5",
        "--json",
        "--no-chat",
    ]
    assert main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(args) == 0
    second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first == second and len(first) == 2
    assert all(row["method"] == "greedy" and 0 < len(row["token_ids"]) <= 5 for row in first)


def test_generate_compares_methods_with_throughput_table(capsys, tiny_model_dir):
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_model_dir,
                "--method",
                "greedy",
                "--method",
                "sample",
                "--temperature",
                "0.7",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "=== greedy |" in captured.out and "=== sample |" in captured.out
    assert "tokens/s" in captured.out and "loaded" in captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "no-such-model"], "smollm2-135m-instruct"),
        (["generate", "--method", "telepathy"], "unknown decoding method 'telepathy'"),
        (["generate", "--method", "sample", "--temperature", "0"], "temperature must be > 0"),
        (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be an integer > 0"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tiny_model_dir, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", tiny_model_dir]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.real_model
def test_generate_on_the_default_model_prints_text(capsys):
    from cdlm.models.registry import get_registered

    if not get_registered("smollm2-135m-instruct").is_installed():
        pytest.skip("models extra not installed")
    assert main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
