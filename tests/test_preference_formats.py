"""Issue 15.13: every preference format TRL's DPOTrainer accepts (standard or conversational, explicit or implicit
prompt) is accepted by every objective, by DistiLLM-2's pair reading and by reward-model training, and gives the
same token ids as its explicit form."""

from __future__ import annotations

import pytest
from datasets import Dataset
from peft import LoraConfig

from cdlm import testing
from cdlm.alignment.distill.dataset import tokenize_pair_rows
from cdlm.alignment.preference.config import METHODS, PreferenceConfig
from cdlm.alignment.preference.data import validate_preference_dataset, with_explicit_prompt
from cdlm.alignment.preference.trainer import PreferenceTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Replies differ from their first word on, so TRL's prompt extraction recovers exactly these prompts.
TEXT = [
    {"prompt": "Human: How do I bake bread? Assistant:", "chosen": " Mix flour and water.", "rejected": " No."},
    {"prompt": "Question: How many clips?", "chosen": " She sold 24 clips.", "rejected": " The quick brown fox."},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "How do I bake bread?"}],
        "chosen": [{"role": "assistant", "content": "Mix flour and water."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {
        "prompt": [{"role": "user", "content": "How many clips?"}],
        "chosen": [{"role": "assistant", "content": "She sold 24 clips."}],
        "rejected": [{"role": "assistant", "content": "The quick brown fox."}],
    },
]


def implicit(rows):
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]


FORMATS = {
    "standard": TEXT,
    "standard_implicit": implicit(TEXT),
    "conversational": CHAT,
    "conversational_implicit": implicit(CHAT),
}
EXPLICIT = {"standard": TEXT, "standard_implicit": TEXT, "conversational": CHAT, "conversational_implicit": CHAT}
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return testing.tiny_tokenizer()


@pytest.mark.parametrize("name", list(FORMATS))
def test_prompt_is_extracted_as_trl_does(name):
    dataset, report = validate_preference_dataset(Dataset.from_list(FORMATS[name]))
    assert report.kept == 2
    assert dataset.to_list() == [{k: r[k] for k in dataset.column_names} for r in EXPLICIT[name]]


def test_missing_replies_are_one_clear_error():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        with_explicit_prompt(Dataset.from_list([{"prompt": "a", "chosen": "b"}]))
    # an empty implicit reply is reported as empty (TRL's extraction would crash on it)
    dataset, report = validate_preference_dataset(
        Dataset.from_list([*implicit(TEXT), {"chosen": "", "rejected": "Question: x"}]), on_invalid="drop"
    )
    assert report.empty_chosen == [2] and len(dataset) == 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_objective_trains_on_every_format(method, name, tokenizer, tmp_path):
    config = PreferenceConfig(
        output_dir=str(tmp_path),
        method=method,
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=64,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        displacement_pairs=0,
        **({"sparsepo_mask_type": "activation"} if method == "sparsepo" else {}),
    )

    def trainer_for(rows):
        return PreferenceTrainer(
            testing.tiny_llama(seed=0),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LORA,
        )

    trainer = trainer_for(FORMATS[name])
    reference = trainer_for(EXPLICIT[name]) if name.endswith("implicit") else trainer
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert (
        trainer.train_dataset.select_columns(columns).to_list()
        == reference.train_dataset.select_columns(columns).to_list()
    )
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("name", ["standard_implicit", "conversational_implicit"])
def test_distillm2_pairs_accept_implicit_prompts(name, tokenizer):
    got = tokenize_pair_rows(FORMATS[name], tokenizer)
    expected = tokenize_pair_rows(EXPLICIT[name], tokenizer)
    for a, b in zip(got, expected):
        assert (a["prompt_ids"], a["chosen_ids"], a["rejected_ids"]) == (
            b["prompt_ids"],
            b["chosen_ids"],
            b["rejected_ids"],
        )


def test_reward_model_trains_on_every_format(tokenizer, tmp_path):
    from cdlm.alignment.rl.reward_model import train_reward_model

    base = tmp_path / "base"
    testing.tiny_llama(seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    for name, rows in FORMATS.items():
        trainer = train_reward_model(
            base,
            tokenizer,
            Dataset.from_list(rows),
            tmp_path / name,
            max_steps=1,
            per_device_train_batch_size=2,
            max_length=64,
            lora_r=4,
        )
        assert trainer.state.global_step == 1, name
        assert len(trainer.train_dataset) == 2, name  # no pair silently dropped
