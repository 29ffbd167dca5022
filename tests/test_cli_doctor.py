"""``cdlm doctor``: the trainers' launch rule applied to an accelerate config before ``accelerate launch`` runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import cdlm.alignment.parallel as parallel
from cdlm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.fixture
def cpu_without_deepspeed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(parallel, "_has_accelerator", lambda: False)


def test_deepspeed_config_without_deepspeed_is_one_line_before_launch(cpu_without_deepspeed, capsys):
    assert main(["doctor", "--accelerate-config", str(CONFIGS / "deepspeed_zero2.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert "deepspeed_zero2.yaml: the accelerate config asks for DeepSpeed" in err and "pip install deepspeed" in err


def test_fsdp_config_without_gpus_is_refused_and_ddp_config_passes(cpu_without_deepspeed, capsys):
    assert main(["doctor", "--accelerate-config", str(CONFIGS / "fsdp.yaml")]) == 2
    assert "asks for FSDP, which needs GPUs" in capsys.readouterr().err
    assert main(["doctor", "--accelerate-config", str(CONFIGS / "multi_gpu.yaml")]) == 0
    assert "can run here" in capsys.readouterr().out


def test_trainer_start_and_doctor_share_one_rule(cpu_without_deepspeed, monkeypatch):
    from cdlm.cli.doctor_cmd import accelerate_config_problem
    from cdlm.cli.training import _check_deepspeed
    from cdlm.errors import MissingDependencyError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(MissingDependencyError) as raised:
        _check_deepspeed()
    assert str(raised.value) == accelerate_config_problem(str(CONFIGS / "deepspeed_zero3.yaml"))


def test_bad_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["doctor", "--accelerate-config", str(tmp_path / "list.yaml")]) == 2
    assert "is not an accelerate config" in capsys.readouterr().err
    assert main(["doctor", "--accelerate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_lists_versions_models_and_how_to_get_missing_features(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("python ") and "transformers " in out and "torch threads: " in out
    assert "model smollm2-135m-instruct: " in out
    for line in out.splitlines():
        if ": no; " in line:  # every missing feature names how to get it
            assert "pip install" in line or "scripts/setup_vllm.sh" in line
