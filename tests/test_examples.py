"""The examples keep the working tree clean and say how to run them (issue 26: six untracked folders).

Running every example here would take many CPU-minutes (train_dpo.py alone: 6.4), so these checks read the
scripts: every output path they pass is under runs/ (ignored by git) or computed (a temporary folder).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
OUTPUT_KEYWORDS = {"output_dir", "output"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_outputs_go_under_runs_or_a_temporary_folder(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        values = [kw.value for kw in node.keywords if kw.arg in OUTPUT_KEYWORDS]
        if getattr(node.func, "id", getattr(node.func, "attr", "")) == "generate_baselines":
            values.append(node.args[4])  # the cache file
        for value in values:
            text = ast.unparse(value)
            if isinstance(value, (ast.Constant, ast.JoinedStr)):
                assert text.strip("f'\"").startswith("runs/"), f"{path.name}: writes {text} into the current folder"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_docstring_says_how_to_run_it(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert f"python examples/{path.name}" in doc


def test_runs_is_ignored_by_git():
    check = subprocess.run(
        ["git", "check-ignore", "-q", "runs/examples/dpo-smollm2/adapter_model.safetensors"], cwd=ROOT
    )
    if check.returncode == 128:
        pytest.skip("not a git checkout")
    assert check.returncode == 0
