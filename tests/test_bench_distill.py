"""benchmarks/bench_distill.py: its text metrics, data order, record handling, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_distill.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lcs_dp(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_matches_dynamic_programming(bench):
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert bench.lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l(bench):
    assert bench.rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bench.rouge_l_f1("", "anything") == 0.0
    # LCS "the cat the mat" = 4 of 6 reference / 5 candidate words
    precision, recall = 4 / 5, 4 / 6
    expected = 2 * precision * recall / (precision + recall)
    assert bench.rouge_l_f1("the cat on the mat", "the cat sat near the mat") == pytest.approx(expected)


def test_final_number(bench):
    assert bench.final_number("so 3 + 4 = 7.\n#### 1,234") == "1234"
    assert bench.final_number("She pays $18.00 in total.") == "18"
    assert bench.final_number("12 apples and 2.5 pears") == "2.5"
    assert bench.final_number("no digits here") is None
    assert bench.final_number("#### -5") == "-5"


def test_data_order_is_seeded_and_covers_epochs(bench):
    order = bench.data_order(3, 10, steps=7, batch=4)
    assert len(order) == 28 and sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order == bench.data_order(3, 10, steps=7, batch=4)
    assert order != bench.data_order(4, 10, steps=7, batch=4)


def test_summary_prefers_finished_attempts(bench):
    names = [name for name, _, _ in bench.METRICS]

    def ev(method, seed, attempt, step, value):
        return {
            "config": "c",
            "attempt": attempt,
            "method": method,
            "seed": seed,
            "kind": "eval",
            "step": step,
            "metrics": dict.fromkeys(names, value),
        }

    end = {"train_s": 2.0, "eval_s": 1.0, "train_tokens": 100, "tokens_per_s": 50.0, "details": {}}
    records = [
        ev("initial", 0, "i0", 0, 4.0),
        ev("initial", 1, "i1", 0, 4.0),
        ev("fkl", 0, "a", 5, 3.0),  # killed attempt
        ev("fkl", 0, "b", 5, 2.5),
        ev("fkl", 0, "b", 10, 2.0),
        {"config": "c", "attempt": "b", "method": "fkl", "seed": 0, "kind": "final", "step": 10, **end},
        ev("fkl", 1, "c", 5, 1.0),
        ev("fkl", 1, "c", 10, 1.0),
        {"config": "c", "attempt": "c", "method": "fkl", "seed": 1, "kind": "final", "step": 10, **end},
        ev("fkl", 2, "x", 10, 9.0) | {"config": "other settings"},
        {"config": "c", "attempt": "g", "method": "gkd", "seed": 0, "kind": "failed", "error": "ImportError: x"},
    ]
    assert bench.finished_runs(records, "c") == {("fkl", 0), ("fkl", 1)}
    summary = bench.summarize(records, "c", ["fkl", "gkd"], [0, 1])
    row = summary["methods"]["fkl"]
    assert row["seeds"] == [0, 1] and row["complete_seeds"] == 2
    mean, std = row["metrics"]["kl_teacher_student"]
    assert mean == pytest.approx(1.5) and std == pytest.approx(0.7071, abs=1e-3)
    assert [step for step, _ in row["curves"][0]] == [0, 5, 10]
    assert summary["failed"] == {"gkd": "ImportError: x"}
    header = {
        "title": "t",
        "command": "c",
        "machine": "m",
        "wall_s": 1.0,
        "workers": 1,
        "seeds": [0, 1],
        "methods": ["fkl", "gkd", "rkl"],
        "data": "d",
        "budget": "b",
        "teacher_reference": "n/a",
    }
    table = bench.render_table(summary, header)
    assert "| fkl | 2/2 | 1.500 ± 0.707 (0.38x)" in table
    assert "| gkd | failed: ImportError: x |" in table
    assert "not run (time budget or not reached): rkl" in table


@pytest.mark.slow
def test_tiny_end_to_end_and_resume(bench, tmp_path, capsys):
    from cdlm import testing

    teacher = tmp_path / "tiny"
    testing.tiny_llama(0).save_pretrained(teacher)
    testing.tiny_tokenizer().save_pretrained(teacher)
    common = ["--teacher", str(teacher), "--student-layers", "2", "--device", "cpu", "--train", "6", "--eval", "3"]
    common += ["--steps", "2", "--eval-every", "1", "--max-new-tokens", "6", "--seeds", "0", "--batch-size", "2"]
    common += ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert bench.main(common) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    finals = {r["method"] for r in records if r["kind"] == "final"}
    assert finals == set(bench.ALL_METHODS), [r.get("error") for r in records if r["kind"] == "failed"]
    evals = [r for r in records if r["kind"] == "eval" and r["method"] == "fkl"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["train_tokens"] > 0 for r in records if r["kind"] == "final")
    assert (tmp_path / "out" / "table.md").exists() and (tmp_path / "out" / "summary.json").exists()
    # A rerun with the same settings resumes: nothing left to do, the same table.
    before = len(records)
    assert bench.main(common) == 0
    after = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert len(after) == before
