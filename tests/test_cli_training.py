"""The trainer commands' generated flags, settings precedence, resume rule, and the CLI's error contract."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest

from cdlm import testing
from cdlm.cli import build_parser, main
from cdlm.cli.config_args import FieldSpec, add_field_arguments, field_specs, plain_help
from cdlm.cli.training import TrainingCommand

PAIRS = [
    {"prompt": "Is water wet?", "chosen": " Yes, it is.", "rejected": " No."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."},
]


def _subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in _subcommand_parsers(sub).items()})
    return found


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.fixture(scope="module")
def parsers():
    return _subcommand_parsers(build_parser())


def test_one_flag_name_per_setting_across_trainer_commands(parsers):
    """The old hand-written drift (--lr vs --learning-rate, --grad-accum, --lora-targets) cannot come back."""
    trainers = [parsers["train"], parsers["distill train"], parsers["rl"]]
    shared = [
        "--learning-rate",
        "--gradient-accumulation-steps",
        "--lora-r",
        "--lora-target-modules",
        "--seed",
        "--logging-steps",
        "--report-to",
        "--bf16",
        "--max-grad-norm",
        "--output-dir",
        "--config",
        "--no-resume",
        "--threads",
        "--save-steps",
    ]
    for flag in (
        "--per-device-train-batch-size",
        "--push-to-hub",
        "--lr-scheduler-type",
        "--warmup-steps",
        "--num-train-epochs",
    ):
        assert flag in _flags(parsers["train"]) and flag in _flags(parsers["distill train"])
        assert flag not in _flags(parsers["rl"])  # PPO ignores them, so it offers no flag that would do nothing
    for parser in trainers:
        flags = _flags(parser)
        for flag in shared:
            assert flag in flags, (parser.prog, flag)
        for retired in ("--lr", "--grad-accum", "--lora-targets", "--batch-size", "--epochs", "--resume"):
            assert retired not in flags, (parser.prog, retired)
    # the same setting has the same default in every command: it comes from one dataclass field
    defaults = {parser.prog: _flags(parser)["--lora-r"].help for parser in trainers}
    assert len(set(defaults.values())) == 1, defaults


def test_every_config_field_of_cdlm_is_a_flag_with_choices_and_plain_help(parsers):
    from cdlm.alignment.distill.config import DistiLLM2Config
    from cdlm.alignment.preference.config import METHODS, PreferenceConfig

    train = _flags(parsers["train"])
    for spec in field_specs(PreferenceConfig):
        assert spec.flag in train, spec.name
    assert tuple(train["--method"].choices) == METHODS
    distill = _flags(parsers["distill train"])
    for spec in field_specs(DistiLLM2Config):
        assert spec.flag in distill, spec.name
    assert "fkl" in distill["--loss-type"].choices
    for parser in parsers.values():
        assert "``" not in (parser.description or "") and ":class:" not in (parser.description or ""), parser.prog
        for action in parser._actions:
            text = action.help or ""
            assert "``" not in text and ":class:" not in text and ":func:" not in text, (parser.prog, text)


def test_plain_help_strips_restructured_text():
    assert (
        plain_help("See :class:`~trl.DPOConfig` and ``beta``; use `x`.\n  Done 50%")
        == "See DPOConfig and beta; use x. Done 50%%"
    )


def test_generated_flags_parse_types_and_leave_absent_settings_unset():
    @dataclasses.dataclass
    class Example:
        rate: float = dataclasses.field(default=0.5, metadata={"help": "a rate"})
        names: list[str] = dataclasses.field(default_factory=list)
        flag: bool = False
        mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
        limit: int | None = None

    parser = argparse.ArgumentParser()
    specs = field_specs(Example)
    assert [s.name for s in specs] == ["rate", "names", "flag", "mode", "limit"]
    assert specs[4] == FieldSpec("limit", "int", None, "", None, False, True)
    add_field_arguments(parser, specs, "example")
    args = parser.parse_args(["--rate", "0.25", "--names", "x", "y", "--flag", "--limit", "none"])
    assert (args.rate, args.names, args.flag, args.limit) == (0.25, ["x", "y"], True, None)
    assert not hasattr(parser.parse_args([]), "rate")  # absent: the dataclass default applies later
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_precedence_config_defaults_then_yaml_then_flags(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: 0.001\nbeta: 0.3\nlora_r: 4\ndataset: pairs.jsonl\n")
    parser = argparse.ArgumentParser()
    from cdlm.cli.train_cmd import COMMAND

    COMMAND.add_arguments(parser)
    args = parser.parse_args(
        ["--output-dir", str(tmp_path / "o"), "--config", str(config), "--learning-rate", "0.002"]
    )
    settings = COMMAND.resolve(args)
    assert settings.config.learning_rate == 0.002  # flag beats YAML
    assert settings.config.beta == 0.3 and settings.lora.lora_r == 4  # YAML beats defaults
    assert settings.data.dataset == "pairs.jsonl"
    assert settings.config.per_device_train_batch_size == 4  # PreferenceConfig's own default
    config.write_text("learning_rate: 0.001\nlearnig_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown setting.*learnig_rate"):
        COMMAND.resolve(args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-steps", "0"], "max_steps must be >= 1"),
        (["--num-train-epochs", "0"], "num_train_epochs must be > 0"),
        (["--push-to-hub"], "offline"),
        (["--lora-r", "-1"], "lora_r must be >= 0"),
    ],
)
def test_trainer_commands_refuse_bad_budgets_before_writing(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never-created"
    assert main(["train", "--model", "no-such-model", "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_report_to_a_missing_logger_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    assert main(["train", "--model", "x", "--output-dir", str(tmp_path / "o"), "--report-to", "tensorboard"]) == 2
    assert "cdlm[tensorboard]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_train")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return folder


def test_resume_refuses_changed_settings_and_continues_unchanged_ones(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in PAIRS) + "\n")
    out = tmp_path / "run"
    base = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-length",
        "48",
        "--per-device-train-batch-size",
        "2",
        "--save-steps",
        "1",
        "--lora-r",
        "2",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(base + ["--max-steps", "1"]) == 0
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # issue 15.16: quiet on CPU
    recorded = json.loads((out / "cdlm_run.json").read_text())
    assert recorded["settings"]["lora_r"] == 2 and recorded["weights"].startswith("sha256:")
    capsys.readouterr()
    # a changed hyperparameter would silently mix two runs: refused, naming it
    assert main(base + ["--max-steps", "2", "--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "beta" in err and "--no-resume" in err
    assert not (out / "checkpoint-2").exists()
    # extending the same run is allowed
    assert main(base + ["--max-steps", "2"]) == 0
    assert "resuming from" in capsys.readouterr().err and (out / "checkpoint-2").is_dir()
    # --no-resume starts over with the new settings and records them
    assert main(base + ["--max-steps", "1", "--beta", "0.5", "--no-resume"]) == 0
    assert json.loads((out / "cdlm_run.json").read_text())["settings"]["beta"] == 0.5


def test_only_errors_raised_on_purpose_print_one_line(monkeypatch, capsys):
    import cdlm.cli.models_cmd as models_cmd

    parser_args = ["models"]

    def crash(args):
        raise RuntimeError("a real bug")

    def bad_input(args):
        raise ValueError("bad input X")

    for func, expected in ((bad_input, 2), (crash, None)):
        monkeypatch.setattr(models_cmd, "run", func)
        if expected is None:
            with pytest.raises(RuntimeError, match="a real bug"):  # the traceback is kept
                main(parser_args)
        else:
            assert main(parser_args) == expected
            assert capsys.readouterr().err.strip() == "cdlm models: error: bad input X"


def test_help_imports_no_torch(tmp_path):
    """`cdlm --help` and `cdlm CMD --help` stay fast: no command module imports torch to build its parser."""
    env = {**os.environ, "CDLM_CACHE": str(tmp_path)}
    code = (
        "import sys\n"
        "from cdlm.cli import main\n"
        "for argv in ([], ['train'], ['distill', 'train'], ['rl'], ['generate'], ['eval']):\n"
        "    try:\n"
        "        main([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )  # fills the cache
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stderr.strip().splitlines()[-1] == "NO-TORCH"


def test_python_dash_m_cdlm_runs():
    result = subprocess.run([sys.executable, "-m", "cdlm", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("cdlm ")


def test_training_command_specs_come_from_the_config_class():
    command = TrainingCommand(name="x", config_class="cdlm.alignment.distill.config:DistiLLM2Config")
    (title, specs), *_ = command._specs()
    assert title == "DistiLLM2Config"
    by_name = {spec.name: spec for spec in specs}
    assert by_name["alpha"].default == 0.1 and by_name["learning_rate"].kind == "float"


def test_quiet_by_default_and_progress_bars_with_verbose(tiny_model_dir, tmp_path):
    """Issue 15.16: no weight-loading or tokenizing bars unless --verbose."""
    env = {k: v for k, v in os.environ.items() if "PROGRESS" not in k and k != "TQDM_DISABLE"}
    command = [
        sys.executable,
        "-m",
        "cdlm",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "The quick",
        "--max-new-tokens",
        "2",
        "--no-chat",
        "--json",
    ]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    verbose = subprocess.run([*command, "--verbose"], env=env, capture_output=True, text=True, check=True)
    assert "Loading weights" in verbose.stderr  # the bar exists, so its absence below is the flag's doing
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr
