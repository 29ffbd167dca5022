"""Issue 16.3: ``cdlm eval`` under ``torchrun --nproc_per_node 2`` (gloo, CPU) gives exactly one process's results.

Each rank computes whole processing chunks (batched exactly as in one process) and appends to its own
``samples.rank<R>.jsonl``; rank 0 merges them. The per-example records (every score, log-likelihood and
generated text) and the metrics must equal a one-process run's bit for bit; a killed data-parallel run
resumes from the per-rank files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdlm import testing
from cdlm.cli import main as cli_main
from cdlm.eval_harness.distributed import Shard

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")

WORDS = ["runs", "jumps", "cooks", "sings", "reads", "swims", "paints", "writes"]
HELLASWAG_ROWS = [
    {
        "activity_label": f"Label {i % 5}",
        "ctx_a": f"A person number {i} stands.",
        "ctx_b": "then",
        "endings": [f"{WORDS[(i + k) % 8]} {'far ' * (k % 3)}away." for k in range(4)],
        "label": i % 4,
    }
    for i in range(40)  # 2 scoring chunks of 32 examples: one per rank
]
GSM8K_ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 6)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp")
    folder = work / "model"
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    hs, gsm = work / "hs.jsonl", work / "gsm.jsonl"
    hs.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_ROWS))
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return work, folder, hs, gsm


def _argv(task, folder, data, out, extra=()):
    argv = [
        "eval",
        "--task",
        task,
        "--model",
        str(folder),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--method",
        "cd",
        "--amateur",
        "early-exit:2",
        "--batch-size",
        "2",
        *extra,
    ]
    return argv


def _torchrun(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "cdlm.cli", *argv]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def _records(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")  # wall-clock share, the only field that may differ
    return sorted(records, key=lambda r: r["index"])


def _same_results(one: Path, two: Path) -> None:
    assert _records(two) == _records(one)
    first, second = (json.loads((path / "results.json").read_text()) for path in (one, two))
    assert second["results"] == first["results"] and second["n_samples"] == first["n_samples"]
    assert second["timing"]["processes"] == 2 and first["timing"]["processes"] == 1
    assert json.loads((two / "run.json").read_text()) == json.loads((one / "run.json").read_text())
    assert not list(two.glob("samples.rank*.jsonl"))  # merged into samples.jsonl


def test_two_processes_equal_one_on_hellaswag(setup):
    work, folder, hs, _ = setup
    assert cli_main(_argv("hellaswag", folder, hs, work / "hs1")) == 0
    completed = _torchrun(_argv("hellaswag", folder, hs, work / "hs2"))
    # Rank 0 (the only one that prints) scored just its chunk; the merged run is complete, so rank 1 did the rest.
    assert "[hellaswag | cd | rank 0/2]: 32/32 (100%)" in completed.stderr
    _same_results(work / "hs1", work / "hs2")


def test_two_processes_equal_one_on_gsm8k_and_resume_per_shard(setup):
    work, folder, _, gsm = setup
    extra = ("--fewshot-data", str(gsm), "--num-fewshot", "1", "--max-new-tokens", "4")
    assert cli_main(_argv("gsm8k", folder, gsm, work / "g1", extra)) == 0
    # A killed 2-process run: rank 0 had finished its first chunk (example 0, batch size 2 -> chunks of 2),
    # rank 1 nothing yet, and rank 0's file ends in a torn line.
    resumed = work / "g2"
    resumed.mkdir()
    shutil.copy(work / "g1" / "run.json", resumed / "run.json")
    lines = (work / "g1" / "samples.jsonl").read_text().splitlines()
    done = [line for line in lines if json.loads(line)["index"] in (0, 1)]
    (resumed / "samples.rank0.jsonl").write_text("\n".join(done) + "\n" + lines[-1][:15])
    completed = _torchrun(_argv("gsm8k", folder, gsm, resumed, extra))
    assert "resuming: 2/5 examples" in completed.stderr
    _same_results(work / "g1", resumed)


def test_chunks_are_dealt_round_robin():
    ranks = [Shard(r, 3) for r in range(3)]
    assert [[k for k in range(7) if shard.owns(k)] for shard in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        Shard(2, 2)
