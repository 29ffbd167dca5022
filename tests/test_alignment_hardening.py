"""Hardening of the trainers and training commands (issues 27, 26, 22): each test fails without its fix."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import LoraConfig

from cdlm import testing
from cdlm.alignment.callbacks import NonFiniteTrainingError, StopOnNonFinite
from cdlm.alignment.checkpoints import checkpoint_problem, last_complete_checkpoint
from cdlm.alignment.preference.config import CHANGED_TRL_DEFAULTS, PreferenceConfig
from cdlm.alignment.preference.data import load_preference_dataset
from cdlm.alignment.rl.baselines import BaselineSettings, LazyBaselines, generate_baselines
from cdlm.alignment.rl.rewards import ContrastiveReward, GSM8KReward, reward_identity
from cdlm.alignment.rl.trainer import ContrastivePPOConfig, ContrastivePPOTrainer
from cdlm.cli import main
from cdlm.textio import MalformedRowError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    {"prompt": f"Question {i}: is {i} even?", "chosen": f" {'Yes' if i % 2 == 0 else 'No'}.", "rejected": " Seven."}
    for i in range(40)
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hardening")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _train_args(model, data, out, *extra):
    return [
        "train",
        "--model",
        model,
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-length",
        "32",
        "--per-device-train-batch-size",
        "2",
        "--save-steps",
        "1",
        "--lora-r",
        "2",
        "--displacement-pairs",
        "0",
        *extra,
    ]


# ------------------------------------------------------------------ 27.12, 27.2: settings refused by flag name


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be >= 1, got 0"),
        (["--warmup-steps", "nan"], "--warmup-steps must be a finite number"),
        (["--seed", str(2**40)], "--seed must be in [0, 2**32 - 1]"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
        (["--method", "cpo", "--cpo-alpha", "nan"], "--cpo-alpha must be a finite number"),
        (["--per-device-eval-batch-size", "-3"], "--per-device-eval-batch-size must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_naming_the_flag_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "never-created"
    assert main(["train", "--model", "no-such-model", "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_yaml_values_of_the_wrong_kind_or_non_finite_are_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    for text, message in (("seed: 1.0e+20\n", "--seed must be an int"), ("max_grad_norm: .nan\n", "finite")):
        config.write_text(text)
        out = tmp_path / "o"
        assert main(["rl", "--reward", "rule:gsm8k", "--output-dir", str(out), "--config", str(config)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_library_configs_refuse_non_finite_values(tmp_path):
    with pytest.raises(ValueError, match="cpo_alpha must be a finite number"):
        PreferenceConfig(output_dir=str(tmp_path), method="cpo", cpo_alpha=float("nan"))
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        ContrastivePPOConfig(output_dir=str(tmp_path), learning_rate=float("inf"))


def test_non_finite_weights_or_loss_stop_training():
    model = torch.nn.Linear(2, 2)
    state = type("State", (), {"global_step": 3})()
    args = type("Args", (), {"learning_rate": 1.0})()
    callback = StopOnNonFinite()
    callback.on_step_end(args, state, None, model=model)  # finite: nothing happens
    callback.on_log(args, state, None, logs={"loss": 0.5})
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match="step 3: weight bias is no longer finite"):
        callback.on_step_end(args, state, None, model=model)
    with pytest.raises(NonFiniteTrainingError, match="loss is nan"):
        StopOnNonFinite().on_log(args, state, None, logs={"loss": math.nan})


def test_cli_training_that_diverges_exits_non_zero_without_saving(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:8])
    out = tmp_path / "run"
    code = main(_train_args(tiny_model_dir, data, out, "--max-steps", "4", "--learning-rate", "1e30"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "training stopped at step" in err and "no longer finite" in err
    assert not (out / "adapter_model.safetensors").exists()  # no "saved the dpo adapter"


# ------------------------------------------------------------------ 27.1, 27.15, 22.1: resume and run record


def test_resume_refuses_other_rows_at_the_same_path_and_records_no_secret(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "live.jsonl", PAIRS)
    config = tmp_path / "settings.yaml"
    config.write_text("hub_token: hf_do_not_store_me\n")
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, data, out, "--config", str(config))
    assert main([*args, "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "dpo training: 1/1 (100%)" in err  # 22.1: progress (a status line: stderr is not a terminal here)
    record = (out / "cdlm_run.json").read_text()
    assert "hf_do_not_store_me" not in record and "hub_token" not in record
    assert json.loads(record)["data"]["train"].startswith("sha256:")
    # only the 40th row's rejected reply changes (past the 32 pairs the displacement monitor covered)
    changed = [dict(row) for row in PAIRS]
    changed[39]["rejected"] = " Eight."
    _write_jsonl(data, changed)
    assert main([*args, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and "--no-resume" in err
    assert not (out / "checkpoint-2").exists()
    _write_jsonl(data, PAIRS)  # the same rows again: the run continues, quietly with --quiet
    assert main([*args, "--max-steps", "2", "--quiet"]) == 0
    assert (out / "checkpoint-2").is_dir() and "training:" not in capsys.readouterr().err


# ------------------------------------------------------------------ 27.13: torn checkpoints


def _complete_checkpoint(folder):
    folder.mkdir(parents=True)
    torch.save({"x": torch.ones(3)}, folder / "optimizer.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "trainer_state.json").write_text("{}")


def test_torn_checkpoints_are_detected_and_set_aside(tmp_path):
    for step in (1, 2, 3, 4):
        _complete_checkpoint(tmp_path / f"checkpoint-{step}")
    assert checkpoint_problem(tmp_path / "checkpoint-1") is None
    data = (tmp_path / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(data[:-10])
    data = (tmp_path / "checkpoint-3" / "optimizer.pt").read_bytes()
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert "adapter_model.safetensors is truncated" in checkpoint_problem(tmp_path / "checkpoint-4")
    assert "optimizer.pt is truncated" in checkpoint_problem(tmp_path / "checkpoint-3")
    assert checkpoint_problem(tmp_path / "checkpoint-2") == "no trainer_state.json"
    said = []
    assert last_complete_checkpoint(tmp_path, report=said.append) == tmp_path / "checkpoint-1"
    assert len(said) == 3 and all("interrupted" in line for line in said)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1",
        "torn-checkpoint-2",
        "torn-checkpoint-3",
        "torn-checkpoint-4",
    ]


def test_cli_resumes_from_the_last_complete_checkpoint(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:8])
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, data, out)
    assert main([*args, "--max-steps", "2"]) == 0
    torn = out / "checkpoint-2"
    (torn / "trainer_state.json").unlink()  # killed during the save of step 2
    optimizer = torn / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    capsys.readouterr()
    assert main([*args, "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint-2 is incomplete" in err and f"resuming from {out / 'checkpoint-1'}" in err
    assert (out / "checkpoint-3").is_dir() and (out / "torn-checkpoint-2").is_dir()


# ------------------------------------------------------------------ 27.3, 27.11: preference data


def test_partially_split_files_are_refused_with_the_line(tmp_path):
    rows = [dict(row, split="train") for row in PAIRS[:4]] + [dict(row, split="test") for row in PAIRS[4:6]]
    del rows[2]["split"]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(MalformedRowError, match=rf"{path}:3 has no 'split' while 5 of 6 rows"):
        load_preference_dataset(path, split="test")
    assert len(load_preference_dataset(path, split=None)) == 6  # no split asked: every row, as documented
    csv = tmp_path / "mixed.csv"
    csv.write_text("prompt,chosen,rejected,split\na,b,c,train\nd,e,f,\ng,h,i,test\n")
    with pytest.raises(MalformedRowError, match=r"mixed.csv \(row 2\) has no 'split'"):
        load_preference_dataset(csv, split="train")


@pytest.mark.parametrize(
    "second_line,message",
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"', ":2 is not valid JSON"),
        ('["prompt", "chosen"]', ":2 is not a JSON object (got list)"),
        ('{"prompt": "a", "chosen": 7, "rejected": "c"}', ":2: 'chosen' must be text or a list of chat messages"),
        ('{"prompt": "a", "chosen": "b", "rejected": [1, 2]}', ":2: 'rejected' must be text or a list"),
        ('{"prompt": "a", "rejected": "c"}', ":2 lacks 'chosen'"),
    ],
)
def test_preference_file_errors_name_the_file_line(tmp_path, second_line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + second_line + "\n")
    with pytest.raises(MalformedRowError) as caught:
        load_preference_dataset(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_non_utf8_preference_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(MalformedRowError, match=rf"{path}:2 is not UTF-8"):
        load_preference_dataset(path)


def test_pair_and_prompt_files_name_the_line(tmp_path):
    from cdlm.alignment.distill.pairs import read_pairs, read_prompts

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}\n{"prompt_ids": "1 2"}\n')
    with pytest.raises(MalformedRowError, match=rf"{pairs}:2: 'prompt_ids' must be a list of token ids"):
        read_pairs(pairs)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\u2028still first\nsecond\x0cstill second\n")
    assert read_prompts(prompts) == ["first\u2028still first", "second\x0cstill second"]
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "a"}\n{"question": 5}\n')
    with pytest.raises(MalformedRowError, match=rf"{questions}:2: 'question' must be text"):
        read_prompts(questions)


def test_rl_prompts_file_errors_name_the_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 1?", "answer": 2}\n{"question": "2 + 2?"}\n')
    out = tmp_path / "o"
    assert main(["rl", "--reward", "rule:gsm8k", "--prompts-file", str(prompts), "--output-dir", str(out)]) == 2
    assert f"{prompts}:2 has no 'prompt' field" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ 27.4, 27.10, 27.3: CHES


def test_ches_validates_before_writing_anything(tmp_path, tiny_model_dir, capsys):
    lacking = _write_jsonl(tmp_path / "no_chosen.jsonl", [{"prompt": "a", "rejected": "b"}])
    out = tmp_path / "ches"
    base = ["data", "ches", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", str(out), "--split", "all"]
    assert main([*base, "--dataset", str(lacking)]) == 2
    assert "lacks 'chosen'" in capsys.readouterr().err and not out.exists()
    # tiny_llama attends to 512 positions: a 600-token reply is refused, not scored
    long = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Is it?", "chosen": " 0 1" * 300, "rejected": " No."}])
    assert main([*base, "--dataset", str(long)]) == 2
    err = capsys.readouterr().err
    assert "past the model's context of 512" in err and "--max-length" in err and not (out / "run.json").exists()
    assert main([*base, "--dataset", str(long), "--max-length", "1000"]) == 2
    assert "max_length=1000 is past the model's context" in capsys.readouterr().err
    # cut to the context, it is scored; and the corrected command is not blocked by the refused ones
    assert main([*base, "--dataset", str(long), "--max-length", "64"]) == 0
    record = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert record["chosen_tokens"] < 64 and math.isfinite(record["ches"])


def test_ches_refuses_partially_split_data(tmp_path, tiny_model_dir, capsys):
    rows = [dict(PAIRS[0], split="train"), dict(PAIRS[1])]
    data = _write_jsonl(tmp_path / "part.jsonl", rows)
    out = tmp_path / "ches"
    assert main(["data", "ches", "--model", tiny_model_dir, "--dataset", str(data), "--output-dir", str(out)]) == 2
    assert f"{data}:2 has no 'split'" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ 27.7, 26.7: contrastive baselines


def count_reward(prompts, completions, answer=None, **kwargs):
    return [float(len(c)) + (a or 0) for c, a in zip(completions, answer or [0] * len(completions))]


def test_baseline_cache_records_reward_and_answers_and_refuses_changes(tmp_path):
    tokenizer, model = testing.tiny_tokenizer(), testing.tiny_llama(0)
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(2)]
    path = tmp_path / "baselines.jsonl"
    settings = BaselineSettings(k=2, max_new_tokens=3, seed=1, reward="rule:a")
    cache = generate_baselines(model, tokenizer, rows, count_reward, path, settings)
    assert cache.columns(rows[1]["prompt"]) == {"answer": 2}
    with pytest.raises(ValueError, match=r"different settings \(reward\)"):
        generate_baselines(model, tokenizer, rows, count_reward, path, BaselineSettings(k=2, max_new_tokens=3, seed=1))
    moved = [rows[0], {"prompt": rows[1]["prompt"], "answer": 7}]
    with pytest.raises(ValueError, match="now comes with"):
        generate_baselines(model, tokenizer, moved, count_reward, path, settings)
    assert reward_identity(GSM8KReward()) != reward_identity(GSM8KReward(format_reward=0.1))
    # without an explicit identity the reward's own is recorded: another reward function is refused too
    unnamed = BaselineSettings(k=2, max_new_tokens=3, seed=1)
    other = tmp_path / "other.jsonl"
    assert (
        "count_reward" in generate_baselines(model, tokenizer, rows, count_reward, other, unnamed).settings["reward"]
    )
    with pytest.raises(ValueError, match=r"different settings \(reward\)"):
        generate_baselines(model, tokenizer, rows, lambda p, c, **k: [0.0] * len(c), other, unnamed)


def test_ppo_samples_baselines_only_for_the_prompts_it_uses(tmp_path):
    tokenizer = testing.tiny_tokenizer()
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(16)]
    settings = BaselineSettings(k=2, max_new_tokens=3, seed=0, reward="count")
    path = tmp_path / "baselines.jsonl"
    lazy = LazyBaselines(tokenizer, count_reward, path, settings, batch_size=4)
    config = ContrastivePPOConfig(
        output_dir=str(tmp_path / "ppo"),
        num_iterations=1,
        rollout_batch_size=2,
        mini_batch_size=2,
        ppo_epochs=1,
        max_new_tokens=3,
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    trainer = ContrastivePPOTrainer(
        testing.tiny_llama(0), config, tokenizer, ContrastiveReward(count_reward, lazy), rows, peft_config=lora
    )
    trainer.train()
    used = {row["prompt"] for row in trainer._batch_rows(0)}
    assert lazy.sampled == 2 and set(lazy) == used  # 2 of 16 prompts baselined
    # the same prompts sampled eagerly (another batch composition) give the same cached responses
    eager = generate_baselines(
        testing.tiny_llama(0), tokenizer, [r for r in rows if r["prompt"] in used], count_reward,
        tmp_path / "eager.jsonl", settings, batch_size=8,
    )  # fmt: skip
    assert {p: eager.responses(p) for p in used} == {p: lazy.cache.responses(p) for p in used}


# ------------------------------------------------------------------ 27.16: torch.load, --limit


def test_ppo_checkpoints_load_with_weights_only(tmp_path, monkeypatch):
    tokenizer = testing.tiny_tokenizer()
    config = ContrastivePPOConfig(
        output_dir=str(tmp_path), num_iterations=1, rollout_batch_size=2, mini_batch_size=2, max_new_tokens=2
    )
    trainer = ContrastivePPOTrainer(
        testing.tiny_llama(0), config, tokenizer, lambda p, c, **k: [0.0] * len(c), ["a", "b"],
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
    )  # fmt: skip
    trainer.train()
    calls = []
    real = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    trainer.load_checkpoint(trainer.latest_checkpoint())
    assert calls == [True, True]


def test_distill_generate_refuses_limit_below_one(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    output = tmp_path / "pairs.jsonl"
    code = main(
        ["distill", "generate", "--teacher", "t", "--student", "s", "--prompts-file", str(prompts)]
        + ["--output", str(output), "--limit", "0"]
    )
    assert code == 2 and "--limit must be >= 1, got 0" in capsys.readouterr().err and not output.exists()


# ------------------------------------------------------------------ 26.4: TRL defaults, ignored settings


def test_changed_trl_defaults_are_stated_in_the_help(capsys):
    from trl import DPOConfig

    assert set(CHANGED_TRL_DEFAULTS) == {
        "learning_rate",
        "num_train_epochs",
        "per_device_train_batch_size",
        "max_length",
        "logging_steps",
        "save_steps",
    }
    for name, (ours, trl_default) in CHANGED_TRL_DEFAULTS.items():
        assert getattr(DPOConfig, name) == trl_default and getattr(PreferenceConfig, name) == ours != trl_default
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "TRL default: 1e-06. (default: 5e-05)" in help_text and "TRL default: 1024" in help_text


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"method": "cpo", "loss_type": "ipo"}, "method='cpo' computes its own loss and ignores loss_type"),
        ({"method": "sparsepo", "loss_type": ["hinge"]}, "ignores loss_type"),
        ({"method": "dpo", "cpo_alpha": 0.5}, "method='dpo' ignores cpo_alpha"),
        ({"method": "apo_zero", "sparsepo_chunk_size": 8}, "ignores sparsepo_chunk_size"),
        ({"method": "sparsepo", "sparsepo_mask_type": "activation", "sparsepo_mask_l1": 0.1}, "sparsepo_mask_l1"),
        ({"method": "sparsepo", "sparsepo_activation": "attn"}, "'learned' ignores sparsepo_activation"),
    ],
)
def test_settings_a_method_ignores_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PreferenceConfig(output_dir=str(tmp_path), use_cpu=True, **settings)


def test_cpo_refuses_a_reference_model(tmp_path):
    from datasets import Dataset

    from cdlm.alignment.preference.trainer import PreferenceTrainer

    config = PreferenceConfig(output_dir=str(tmp_path), method="cpo", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="reference-free and would ignore the given ref_model"):
        PreferenceTrainer(
            testing.tiny_llama(0),
            ref_model=testing.tiny_llama(1),
            args=config,
            train_dataset=Dataset.from_list(PAIRS[:2]),
            processing_class=testing.tiny_tokenizer(),
        )


# ------------------------------------------------------------------ 22.9: DeepSpeed


def test_deepspeed_launch_without_deepspeed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "o"
    assert main(["train", "--model", "x", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install deepspeed" in err and len(err.splitlines()) == 1 and not out.exists()
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"


def test_rl_no_resume_starts_baselines_over_and_a_shared_cache_refuses_other_settings(
    tmp_path, tiny_model_dir, capsys
):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(4)])
    out = tmp_path / "run"
    base = ["rl", "--model", tiny_model_dir, "--reward", "rule:gsm8k", "--prompts-file", str(prompts)]
    base += ["--contrastive-k", "2", "--num-iterations", "1", "--rollout-batch-size", "2", "--mini-batch-size", "2"]
    base += ["--max-new-tokens", "3", "--lora-r", "2", "--output-dir", str(out)]
    assert main(base) == 0
    assert len((out / "baselines.jsonl").read_text().splitlines()) == 1 + 2  # lazily: the 2 prompts used
    capsys.readouterr()
    assert main([*base, "--baseline-temperature", "0.5", "--no-resume"]) == 0, capsys.readouterr().err
    header = json.loads((out / "baselines.jsonl").read_text().splitlines()[0])
    assert header["settings"]["temperature"] == 0.5 and header["settings"]["reward"].startswith("rule:gsm8k")
    shared = ["--baseline-cache", str(out / "baselines.jsonl"), "--output-dir", str(tmp_path / "other")]
    assert main([*base[:-2], *shared]) == 2
    assert "different settings (temperature)" in capsys.readouterr().err
