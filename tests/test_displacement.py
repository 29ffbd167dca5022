"""Likelihood-displacement monitoring: every preference trainer logs the drift of chosen/rejected log-probs since
step 0 on a fixed set, with values equal to a direct computation from the model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from cdlm import testing
from cdlm.alignment.preference.ches import tokenize_pairs
from cdlm.alignment.preference.config import PreferenceConfig
from cdlm.alignment.preference.displacement import METRIC_KEYS, REFERENCE_FILE, displacement_metrics
from cdlm.alignment.preference.trainer import PreferenceTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = [
    {
        "prompt": "Human: How do I bake bread? Assistant:",
        "chosen": " Mix flour, water, yeast and salt.",
        "rejected": " No.",
    },
    {"prompt": "Question: How many clips?", "chosen": " She sold 24 clips.", "rejected": " The quick brown fox."},
]
HELD_OUT = [
    {"prompt": "Human: How do I bake a cake? Assistant:", "chosen": " Mix flour and eggs.", "rejected": " Never."},
    {"prompt": "Question: How many foxes?", "chosen": " 48 foxes.", "rejected": " A man is on a roof."},
    {"prompt": "The lazy dog", "chosen": " sat on the roof.", "rejected": " jumps."},
]
COMMON = dict(
    bf16=False,
    gradient_checkpointing=False,
    report_to=[],
    max_length=24,
    per_device_train_batch_size=2,
    logging_steps=2,
    disable_tqdm=True,
    learning_rate=5e-3,
    seed=0,
)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return testing.tiny_tokenizer()


@torch.no_grad()
def direct_logps(model, tokenizer, pairs: list[dict], max_length: int) -> torch.Tensor:
    """(N, 2) sum of log softmax(logits)[next token] over reply tokens, one unpadded sequence at a time."""
    model.eval()
    out = []
    for row in tokenize_pairs(Dataset.from_list(pairs), tokenizer):
        values = []
        for reply in (row["chosen_ids"], row["rejected_ids"]):
            ids = (row["prompt_ids"] + reply)[:max_length]
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            values.append(logps[len(row["prompt_ids"]) - 1 :].sum())
        out.append(torch.stack(values))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("dpo", {}), ("apo_zero", {}), ("apo_down", {}), ("cpo", {}), ("sparsepo", {"sparsepo_mask_type": "activation"})],
)
def test_trainers_log_displacement_equal_to_direct_computation(method, extra, tokenizer, tmp_path):
    model = testing.tiny_llama(seed=0)
    config = PreferenceConfig(
        output_dir=str(tmp_path),
        method=method,
        max_steps=4,
        save_strategy="no",
        displacement_pairs=3,
        **COMMON,
        **extra,
    )
    trainer = PreferenceTrainer(
        model,
        args=config,
        train_dataset=Dataset.from_list(TRAIN),
        eval_dataset=Dataset.from_list(HELD_OUT),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    initial = direct_logps(trainer.model, tokenizer, HELD_OUT, COMMON["max_length"])
    trainer.train()
    final = direct_logps(trainer.model, tokenizer, HELD_OUT, COMMON["max_length"])
    logged = [entry for entry in trainer.state.log_history if METRIC_KEYS[0] in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # at every logging step
    change = final - initial
    assert change.abs().max() > 1e-2  # training moved the held-out log-probs, so the check below has teeth
    last = logged[-1]
    assert last[METRIC_KEYS[0]] == pytest.approx(float(change[:, 0].mean()), abs=1e-4)
    assert last[METRIC_KEYS[1]] == pytest.approx(float(change[:, 1].mean()), abs=1e-4)
    assert last[METRIC_KEYS[2]] == pytest.approx(float((change[:, 0] < 0).double().mean()))
    assert trainer.displacement.last == {k: last[k] for k in METRIC_KEYS}


def test_displacement_metrics_exact():
    initial = torch.tensor([[-10.0, -12.0], [-5.0, -6.0], [-8.0, -8.0], [-1.0, -2.0]])
    current = torch.tensor([[-11.0, -15.0], [-4.0, -9.0], [-8.0, -7.0], [-1.5, -2.0]])
    assert displacement_metrics(initial, current) == {
        METRIC_KEYS[0]: pytest.approx((-1 + 1 + 0 - 0.5) / 4),
        METRIC_KEYS[1]: pytest.approx((-3 - 3 + 1 + 0) / 4),
        METRIC_KEYS[2]: 0.5,  # pairs 0 and 3 fell; pair 2 unchanged does not count
    }


def test_off_and_training_set_fallback(tokenizer, tmp_path):
    off = PreferenceTrainer(
        testing.tiny_llama(seed=0),
        args=PreferenceConfig(
            output_dir=str(tmp_path / "off"), max_steps=1, save_strategy="no", displacement_pairs=0, **COMMON
        ),
        train_dataset=Dataset.from_list(TRAIN),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    assert off.displacement is None
    fallback = PreferenceTrainer(
        testing.tiny_llama(seed=0),
        args=PreferenceConfig(
            output_dir=str(tmp_path / "on"), max_steps=1, save_strategy="no", displacement_pairs=8, **COMMON
        ),
        train_dataset=Dataset.from_list(TRAIN),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    assert len(fallback.displacement.pairs) == len(TRAIN)  # no eval set: the (at most 8) training pairs


def test_resume_keeps_step_zero_reference(tokenizer, tmp_path):
    """A run resumed from a checkpoint measures from the original step 0, exactly as an uninterrupted run."""

    def make(max_steps):
        return PreferenceTrainer(
            testing.tiny_llama(seed=0),
            args=PreferenceConfig(
                output_dir=str(tmp_path),
                method="dpo",
                max_steps=max_steps,
                save_strategy="steps",
                save_steps=2,
                displacement_pairs=3,
                **COMMON,
            ),
            train_dataset=Dataset.from_list(TRAIN),
            eval_dataset=Dataset.from_list(HELD_OUT),
            processing_class=tokenizer,
            peft_config=LORA,
        )

    straight = make(4)
    straight.train()
    expected = straight.displacement.initial.clone()
    expected_last = straight.displacement.last
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / REFERENCE_FILE).read_text())
    assert torch.tensor(saved["initial_logps"], dtype=torch.float64).equal(expected)
    resumed = make(4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.displacement.initial.equal(expected)
    assert resumed.displacement.last[METRIC_KEYS[0]] == pytest.approx(expected_last[METRIC_KEYS[0]], abs=1e-4)
    (checkpoint / REFERENCE_FILE).unlink()
    with pytest.raises(ValueError, match="step-0 displacement reference"):
        make(4).train(resume_from_checkpoint=str(checkpoint))
