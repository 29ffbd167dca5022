"""``cdlm rl``: bad input gives one-line errors; a tiny end-to-end contrastive PPO run writes its artefacts."""

from __future__ import annotations

import json

import pytest

from cdlm import testing
from cdlm.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rl_tiny")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reward", "rule:gsm8k", "--contrastive-k", "0"], "contrastive_k must be >= 1"),
        (["--reward", "/no/such/model"], "reward model '/no/such/model' not found"),
        (["--reward", "rule:gsm8k", "--prompts-file", "/no/such.jsonl"], "prompts file"),
        (
            ["--reward", "rule:gsm8k", "--rollout-batch-size", "3", "--mini-batch-size", "2"],
            "multiple of mini_batch_size",
        ),
    ],
)
def test_rl_bad_input(extra, message, capsys, tmp_path):
    assert main(["rl", "--output-dir", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_rl_contrastive_end_to_end(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) for i in range(2)))
    out = tmp_path / "run"
    code = main(
        [
            "rl",
            "--model",
            tiny_model_dir,
            "--reward",
            "rule:gsm8k",
            "--contrastive-k",
            "2",
            "--prompts-file",
            str(prompts),
            "--num-iterations",
            "2",
            "--rollout-batch-size",
            "2",
            "--mini-batch-size",
            "1",
            "--max-new-tokens",
            "4",
            "--output-dir",
            str(out),
            "--lora-r",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["iterations"] == 2 and summary["checkpoint"].endswith("checkpoint-2")
    lines = (out / "baselines.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["settings"]["k"] == 2
    assert "iteration 2: reward" in captured.err
