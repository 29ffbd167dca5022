"""PreferenceTrainer behaviour: every method learns on tiny models, bad input is reported, masks save and resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from cdlm import testing
from cdlm.alignment.preference.config import METHODS, PreferenceConfig
from cdlm.alignment.preference.data import (
    default_preference_path,
    load_default_splits,
    load_preference_dataset,
    validate_preference_dataset,
)
from cdlm.alignment.preference.trainer import MASKS_WEIGHTS_NAME, PreferenceTrainer, load_sparse_masks

PAIRS = [
    {
        "prompt": "Human: How do I bake bread? Assistant:",
        "chosen": " Mix flour, water, yeast and salt.",
        "rejected": " No.",
    },
    {"prompt": "Question: How many clips?", "chosen": " She sold 24 clips.", "rejected": " The quick brown fox."},
]
COMMON = dict(
    bf16=False,
    gradient_checkpointing=False,
    report_to=[],
    max_length=64,
    per_device_train_batch_size=2,
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
    learning_rate=2e-3,
    seed=0,
)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return testing.tiny_tokenizer()


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("dpo", {}),
        ("apo_zero", {}),
        ("apo_down", {}),
        ("cpo", {}),
        ("sparsepo", {"sparsepo_mask_type": "learned", "sparsepo_mask_l1": 0.01}),
        ("sparsepo", {"sparsepo_mask_type": "activation", "sparsepo_activation": "mlp"}),
    ],
)
def test_each_method_decreases_loss_and_separates_pairs(method, extra, tokenizer, tmp_path):
    config = PreferenceConfig(output_dir=str(tmp_path), method=method, max_steps=5, **COMMON, **extra)
    trainer = PreferenceTrainer(
        testing.tiny_llama(seed=0),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    before = trainer.preference_metrics(Dataset.from_list(PAIRS))
    trainer.train()
    after = trainer.preference_metrics(Dataset.from_list(PAIRS))
    history = losses(trainer)
    assert len(history) == 5
    assert history[-1] < history[0] - 1e-3, history
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # policy == reference at start
    assert after["reward_margin"] > 0  # on the trained pairs the implicit reward now prefers chosen
    if method == "cpo":
        assert after["logratio_margin"] > before["logratio_margin"]


@pytest.mark.parametrize("method", ["dpo", "sparsepo"])
def test_gemma3_trains(method, tokenizer, tmp_path):
    config = PreferenceConfig(output_dir=str(tmp_path), method=method, max_steps=3, **COMMON)
    trainer = PreferenceTrainer(
        testing.tiny_gemma3(seed=0),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0]


def test_sparsepo_activation_sources_and_independent_masks(tokenizer, tmp_path):
    for extra in (
        {"sparsepo_mask_type": "activation", "sparsepo_activation": "attn", "sparsepo_layers": [0, -1]},
        {"sparsepo_mask_type": "activation", "sparsepo_activation": "residual"},
        {"sparsepo_mask_type": "activation", "sparsepo_activation": "logits"},
        {"sparsepo_mask_type": "learned", "sparsepo_shared_mask": False, "sparsepo_mask_weight_decay": 0.1},
    ):
        config = PreferenceConfig(output_dir=str(tmp_path), method="sparsepo", max_steps=1, **COMMON, **extra)
        trainer = PreferenceTrainer(
            testing.tiny_llama(seed=1),
            args=config,
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
            peft_config=LORA,
        )
        trainer.train()
        logged = trainer.state.log_history[0]
        assert 0.0 <= logged["mask/sparsity"] <= 1.0
        if extra["sparsepo_mask_type"] == "activation":
            assert 0.0 <= logged["mask/mean"] <= 1.0
        else:
            assert "mask/kl_sparsity" in logged
            groups = trainer.optimizer.param_groups
            assert groups[-1]["weight_decay"] == 0.1
            mask_params = {id(p) for p in trainer.mask_module.parameters()}
            assert {id(p) for p in groups[-1]["params"]} == mask_params


def test_activation_mask_properties():
    from cdlm.alignment.preference.sparsepo import activation_token_mask

    generator = torch.Generator().manual_seed(0)
    acts = [torch.randn(3, 6, 5, generator=generator) * scale for scale in (1.0, 100.0)]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    m = activation_token_mask(acts, mask)
    assert m.shape == (3, 6) and not m.requires_grad
    assert torch.all(m[mask == 0] == 0)
    assert torch.all((m >= 0) & (m <= 1))
    for row in range(2):  # min-max per sequence over completion tokens
        values = m[row][mask[row].bool()]
        assert float(values.min()) == 0.0 and abs(float(values.max()) - 1.0) < 1e-6
    assert float(m[2, 5]) == 1.0  # a single completion token gets 1
    # z-normalising each layer first makes the result invariant to a layer's scale
    assert torch.allclose(activation_token_mask([acts[0], acts[1] * 1000], mask), m, atol=1e-5)


def test_learned_masks_save_with_adapter_and_resume(tokenizer, tmp_path):
    config = PreferenceConfig(
        output_dir=str(tmp_path), method="sparsepo", max_steps=2, **{**COMMON, "save_strategy": "steps"}, save_steps=1
    )
    trainer = PreferenceTrainer(
        testing.tiny_llama(seed=0),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert (tmp_path / "final" / MASKS_WEIGHTS_NAME).exists()
    assert (tmp_path / "checkpoint-1" / MASKS_WEIGHTS_NAME).exists()
    loaded = load_sparse_masks(str(tmp_path / "final"))
    for (name, a), b in zip(trainer.mask_module.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), name

    # Resume from checkpoint-1 into a new trainer: its masks come back from the checkpoint.
    config2 = PreferenceConfig(
        output_dir=str(tmp_path), method="sparsepo", max_steps=2, **{**COMMON, "save_strategy": "no"}
    )
    trainer2 = PreferenceTrainer(
        testing.tiny_llama(seed=0),
        args=config2,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    checkpoint_masks = load_sparse_masks(str(tmp_path / "checkpoint-1"))
    trainer2._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    for a, b in zip(trainer2.mask_module.state_dict().values(), checkpoint_masks.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b)


def test_cpo_without_peft_builds_no_reference(tokenizer, tmp_path):
    config = PreferenceConfig(output_dir=str(tmp_path), method="cpo", max_steps=1, **COMMON)
    trainer = PreferenceTrainer(
        testing.tiny_llama(seed=0), args=config, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer
    )
    assert trainer.ref_model is None and trainer.precompute_ref_logps is False
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names
    trainer.train()


# ------------------------------------------------------------------ bad input


def test_unknown_method_and_bad_beta_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preference method 'ppo'"):
        PreferenceConfig(output_dir=str(tmp_path), method="ppo")
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta must be > 0"):
            PreferenceConfig(output_dir=str(tmp_path), method="dpo", beta=beta)
    with pytest.raises(ValueError, match="sets loss_type itself"):
        PreferenceConfig(output_dir=str(tmp_path), method="apo_zero", loss_type="hinge")
    with pytest.raises(ValueError, match="sparsepo_mask_type"):
        PreferenceConfig(output_dir=str(tmp_path), method="sparsepo", sparsepo_mask_type="random")
    assert PreferenceConfig(output_dir=str(tmp_path), method="APO-zero").loss_type == ["apo_zero"]
    assert set(METHODS) == {"dpo", "apo_zero", "apo_down", "cpo", "sparsepo"}


def test_missing_columns_error():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        validate_preference_dataset(Dataset.from_list([{"prompt": "a", "chosen": "b"}]))


def test_empty_and_identical_pairs_are_counted_never_silent(tokenizer, caplog):
    rows = PAIRS + [
        {"prompt": "p", "chosen": "  ", "rejected": "x"},
        {"prompt": "p", "chosen": "x", "rejected": ""},
        {"prompt": "p", "chosen": " same", "rejected": "same "},
        {"prompt": "word " * 80, "chosen": " a", "rejected": " b"},
    ]
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match="4 of 6 preference pairs are unusable"):
        validate_preference_dataset(dataset, tokenizer=tokenizer, max_length=64, on_invalid="error")
    with caplog.at_level(logging.WARNING, logger="cdlm.alignment.preference.data"):
        kept, report = validate_preference_dataset(dataset, tokenizer=tokenizer, max_length=64, on_invalid="drop")
    assert len(kept) == 2 and report.kept == 2
    assert (report.empty_chosen, report.empty_rejected, report.identical, report.prompt_too_long) == (
        [2],
        [3],
        [4],
        [5],
    )
    assert "4 of 6 preference pairs are unusable" in caplog.text and "dropping them, 2 remain" in caplog.text
    kept, _ = validate_preference_dataset(dataset, tokenizer=tokenizer, max_length=64, on_invalid="keep")
    assert len(kept) == 6


def test_trainer_reports_dropped_pairs(tokenizer, tmp_path):
    rows = PAIRS + [{"prompt": "p", "chosen": "x", "rejected": "x"}]
    config = PreferenceConfig(output_dir=str(tmp_path), method="dpo", max_steps=1, **COMMON)
    trainer = PreferenceTrainer(
        testing.tiny_llama(seed=0),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    assert trainer.train_data_report.identical == [2] and len(trainer.train_dataset) == 2
    config = PreferenceConfig(output_dir=str(tmp_path), method="dpo", max_steps=1, on_invalid_pairs="error", **COMMON)
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        PreferenceTrainer(
            testing.tiny_llama(seed=0), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )


def test_shipped_dataset_and_file_loading(tmp_path):
    train, test = load_default_splits()
    assert (len(train), len(test)) == (500, 100)
    assert set(train["id"]).isdisjoint(test["id"])
    assert default_preference_path().exists()
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAIRS))
    assert load_preference_dataset(path).num_rows == 2
    with pytest.raises(FileNotFoundError):
        load_preference_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unsupported preference file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_preference_dataset(tmp_path / "x.txt")


# ------------------------------------------------------------------ CLI


def test_cli_trains_and_resumes(tokenizer, tmp_path, capsys):
    from cdlm.cli import main

    model_dir = tmp_path / "tiny"
    testing.tiny_llama(seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in PAIRS))
    config = tmp_path / "cfg.yaml"
    config.write_text("beta: 0.2\nlearning_rate: 0.001\nlora_r: 4\nlogging_steps: 1\n")
    out = tmp_path / "run"
    base = [
        "train",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-length",
        "64",
        "--per-device-train-batch-size",
        "2",
        "--save-steps",
        "1",
        "--config",
        str(config),
        "--method",
        "cpo",
    ]
    assert main(base + ["--max-steps", "1"]) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "adapter_model.safetensors").exists()
    assert main(base + ["--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-1" in err
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    with pytest.raises(SystemExit) as exit_info:  # choices come from PreferenceConfig's field metadata
        main(["train", "--model", str(model_dir), "--output-dir", str(out), "--method", "orpo"])
    assert exit_info.value.code == 2 and "invalid choice: 'orpo'" in capsys.readouterr().err
    assert main(["train", "--model", str(model_dir), "--output-dir", str(out), "--beta", "0"]) == 2


@pytest.mark.real_model
def test_real_smollm2_sparsepo_steps(smollm2, tmp_path):
    from cdlm.models import load_model

    fresh = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")  # never mutate the session fixture
    train, _ = load_default_splits()
    short = train.select(
        sorted(range(len(train)), key=lambda i: len(train[i]["prompt"]) + len(train[i]["chosen"]))[:4]
    )
    config = PreferenceConfig(
        output_dir=str(tmp_path), method="sparsepo", max_steps=2, sparsepo_layers=[-1], **{**COMMON, "max_length": 96}
    )
    trainer = PreferenceTrainer(
        fresh.model,
        args=config,
        train_dataset=short,
        processing_class=fresh.tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    history = losses(trainer)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
