"""The documented CPU launch of the training commands: ``torchrun --nproc_per_node 2 -m cdlm ...`` == one process.

No ``--use-cpu`` flag: on a machine without GPUs the configs mark a multi-process run as CPU themselves, so the
plain command trains with 2 gloo data-parallel processes (otherwise accelerate would run 2 independent copies
writing one folder). Compared with ``python -m cdlm ...`` on the same global batch: ``cdlm rl`` must give
identical weights (PPO sampling is seeded per prompt, so the rollouts are the same) and one baseline cache
written once; ``cdlm train`` the same adapter weights within 1e-4 (float summation order, AdamW's first steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PAIRS = [
    {"prompt": "Count to five.", "chosen": " 1 2 3 4 5", "rejected": " 7 7"},
    {"prompt": "Name a colour.", "chosen": " Brown, like the fox.", "rejected": " 12 + 9"},
    {"prompt": "What is 2+2?", "chosen": " 2 + 2 = 4", "rejected": " The lazy dog."},
    {"prompt": "Question: How many clips?", "chosen": " She sold 24 clips.", "rejected": " The quick brown fox."},
]


def _cdlm(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "cdlm", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from cdlm import testing

    path = tmp_path_factory.mktemp("tiny")
    testing.tiny_llama(0).save_pretrained(path)
    testing.tiny_tokenizer().save_pretrained(path)
    return path


def test_rl_two_processes_equal_one(model_dir, tmp_path):
    common = [
        "rl",
        "--model",
        str(model_dir),
        "--reward",
        "rule:gsm8k",
        "--num-prompts",
        "4",
        "--num-iterations",
        "2",
        "--rollout-batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--ppo-epochs",
        "1",
        "--max-new-tokens",
        "4",
        "--contrastive-k",
        "2",
        "--lora-r",
        "4",
        "--threads",
        "1",
    ]
    one = _cdlm([*common, "--output-dir", str(tmp_path / "one")], 1)
    two = _cdlm([*common, "--output-dir", str(tmp_path / "two")], 2)
    assert two.stdout.count('"iterations": 2') == 1 == one.stdout.count('"iterations": 2')  # rank 0 reports
    cache_one, cache_two = ((tmp_path / d / "baselines.jsonl").read_text() for d in ("one", "two"))
    assert cache_two == cache_one and len(cache_two.splitlines()) == 1 + 4  # header + one record per prompt
    a, b = (torch.load(tmp_path / d / "checkpoint-2" / "trainable.pt") for d in ("one", "two"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_dpo_two_processes_equal_one(model_dir, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PAIRS), encoding="utf-8")
    common = [
        "train",
        "--model",
        str(model_dir),
        "--method",
        "dpo",
        "--dataset",
        str(data),
        "--max-steps",
        "2",
        "--lora-r",
        "4",
        "--max-length",
        "64",
        "--threads",
        "1",
        "--learning-rate",
        "2e-3",
        "--seed",
        "0",
    ]
    _cdlm([*common, "--per-device-train-batch-size", "2", "--output-dir", str(tmp_path / "one")], 1)
    _cdlm([*common, "--per-device-train-batch-size", "1", "--output-dir", str(tmp_path / "two")], 2)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and a
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    assert moved > 1e-4  # trained (LoRA B starts at zero)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)
