"""The private transformers/TRL members cdlm relies on: each listed with where and why, and pinned by one test.

cdlm extends upstream through public hooks (``compute_loss``, ``log``, callbacks, ``custom_generate``). Where a
private member could not be avoided it is listed in ``CONTRACT`` below, and a test here asserts the signature or
behaviour cdlm needs, so an upstream release that changes it fails one clearly named test instead of a trainer
somewhere deep in the suite. ``test_every_private_upstream_member_cdlm_touches_is_listed`` reads cdlm's source and
fails when a private member of the upstream classes is used without being listed here.

When a use is removed from cdlm, delete its entry and its test (the completeness test then says nothing).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.generation.utils import GenerationMixin
from trl import DPOConfig, DPOTrainer

from cdlm import testing

CDLM = Path(__file__).resolve().parents[1] / "cdlm"

# private member -> (owner upstream, where cdlm uses it, why no public surface does)
CONTRACT: dict[str, tuple[str, str, str]] = {
    "_compute_loss": (
        "trl DPOTrainer",
        "alignment/preference/trainer.py PreferenceTrainer._compute_loss",
        "DPOTrainer.compute_loss only delegates to it; overriding it keeps TRL's loss types (super()) unchanged "
        "next to CPO/SparsePO",
    ),
    "_precompute_ref_logps": (
        "trl DPOTrainer",
        "alignment/preference/trainer.py PreferenceTrainer._precompute_ref_logps",
        "CPO is reference-free: the precompute pass TRL runs in __init__ is made a no-op",
    ),
    "_prepare_dataset": (
        "trl DPOTrainer",
        "alignment/preference/trainer.py preference_metrics; alignment/preference/ches.py tokenize_pairs",
        "TRL's own prompt extraction + EOS + tokenisation, so scored pairs are exactly what training sees "
        "(ches calls it unbound on a stand-in holding only `_tokenizer`)",
    ),
    "_tokenizer": (
        "trl DPOTrainer",
        "alignment/preference/trainer.py preference_metrics; ches.py (stand-in attribute)",
        "the text tokenizer DPOTrainer extracted from processing_class",
    ),
    "_metrics": (
        "trl DPOTrainer",
        "alignment/preference/trainer.py (CPO/SparsePO metrics); alignment/preference/displacement.py",
        "DPOTrainer.log averages this per-mode buffer into the next log entry and clears it",
    ),
    "_tag_names": ("trl DPOTrainer", "alignment/preference/trainer.py PreferenceTrainer", "model-card tags"),
    "_name": ("trl DPOTrainer", "alignment/preference/trainer.py PreferenceTrainer", "model-card title"),
    "_save": (
        "transformers Trainer",
        "alignment/preference/trainer.py PreferenceTrainer._save",
        "SparsePO learned masks live outside the model: written next to every save_model/checkpoint",
    ),
    "_load_from_checkpoint": (
        "transformers Trainer",
        "alignment/preference/trainer.py PreferenceTrainer._load_from_checkpoint",
        "restores the SparsePO masks and the displacement reference when train(resume_from_checkpoint=...)",
    ),
    "_prepare_inputs": (
        "transformers Trainer",
        "preference/trainer.py preference_metrics; preference/displacement.py; distill/trainer.py prediction_step",
        "moves a collated batch to the trainer's device the way training does",
    ),
    "_set_signature_columns_if_needed": (
        "transformers Trainer",
        "alignment/distill/trainer.py DistiLLM2Trainer",
        "keeps the pair/score columns that the model's forward signature does not name",
    ),
    "_signature_columns": ("transformers Trainer", "alignment/distill/trainer.py DistiLLM2Trainer", "(same)"),
    "_pad_token_tensor": (
        "transformers GenerationConfig",
        "decoding/contrastive_search.py, decoding/dola.py (custom_generate loops)",
        "the pad id generate() prepared (from pad_token_id or EOS) for finished rows",
    ),
    "_attn_implementation": (
        "transformers PretrainedConfig",
        "decoding/contrastive_search.py, eval_harness/scoring.py",
        "the shared-prefix fast paths need eager/sdpa attention",
    ),
    "_name_or_path": (
        "transformers PretrainedConfig",
        "models/amateur.py _own_tokenizer",
        "the folder a model came from (the public `config.name_or_path` returns the same and could replace it)",
    ),
}

# cdlm's own private names that happen to equal an upstream private name of an unrelated class.
OWN_NAMES = {
    "_sample": "alignment/rl/baselines.py (a BaselineCache-filling helper, not GenerationMixin._sample)",
    "_prefill": "decoding (cdlm's own incremental-branch helpers)",
}

# Public members cdlm relies on with a meaning beyond their name, asserted below too.
# loss_is_scaled_for_ga / model_accepts_loss_kwargs (DistiLLM2Trainer), fused_lm_head=True (PreferenceTrainer),
# TRL's local `_non_model_keys` copied as cdlm's `_NON_MODEL_KEYS`.

UPSTREAM_CLASSES = [
    Trainer,
    TrainingArguments,
    TrainerCallback,
    DPOTrainer,
    DPOConfig,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    PreTrainedModel,
    PretrainedConfig,
]

PAIRS = [
    {"prompt": "Question: two plus two?", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Question: the sky?", "chosen": " Blue.", "rejected": " Green."},
]


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _dedented(function) -> str:
    return textwrap.dedent(inspect.getsource(function))


def calls(function, attribute: str) -> bool:
    """Whether ``function``'s source calls ``self.<attribute>(...)``."""
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attribute
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        for node in ast.walk(ast.parse(_dedented(function)))
    )


@pytest.fixture(scope="module")
def dpo_trainer(tmp_path_factory):
    """A real tiny DPOTrainer (explicit reference model, so nothing is fetched)."""
    tokenizer = testing.tiny_tokenizer()
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo")),
        report_to=[],
        max_length=32,
        per_device_train_batch_size=2,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = DPOTrainer(
        testing.tiny_llama(seed=0),
        ref_model=testing.tiny_llama(seed=0),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    return trainer, tokenizer


# ---------------------------------------------------------------------------------------------- completeness


def _private_names_in_cdlm() -> dict[str, str]:
    """Private names cdlm reads, sets, defines in a class body, or names in getattr/hasattr/setattr -> first file."""
    found: dict[str, str] = {}

    def note(name: str, path: Path) -> None:
        if name.startswith("_") and not name.startswith("__"):
            found.setdefault(name, str(path.relative_to(CDLM.parent)))

    for path in sorted(CDLM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                note(node.attr, path)
            elif isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        note(statement.name, path)
                    targets = statement.targets if isinstance(statement, ast.Assign) else []
                    targets += [statement.target] if isinstance(statement, ast.AnnAssign) else []
                    for target in targets:
                        if isinstance(target, ast.Name):
                            note(target.id, path)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                note(node.args[1].value, path)
    return found


def _private_names_upstream() -> set[str]:
    """Private members of the upstream classes cdlm subclasses or drives: class members, annotations, self._x = ..."""
    names: set[str] = set()
    for cls in UPSTREAM_CLASSES:
        for klass in cls.__mro__:
            if klass is object or klass.__module__.startswith(("torch", "builtins", "typing")):
                continue
            names.update(vars(klass))
            names.update(inspect.get_annotations(klass))
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            for node in ast.walk(ast.parse(source)):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "self"
                ):
                    names.add(node.attr)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_every_private_upstream_member_cdlm_touches_is_listed():
    used = _private_names_in_cdlm()
    upstream = _private_names_upstream()
    unlisted = {name: used[name] for name in sorted(set(used) & upstream) if name not in CONTRACT | OWN_NAMES}
    assert not unlisted, f"private upstream members used by cdlm but not in CONTRACT: {unlisted}"
    stale = sorted(name for name in CONTRACT if name not in used)
    assert not stale, f"listed in CONTRACT but no longer used by cdlm (remove entry and test): {stale}"
    assert set(CONTRACT) <= upstream, sorted(set(CONTRACT) - upstream)


# ---------------------------------------------------------------------------------------------- TRL DPOTrainer


def test_dpo_compute_loss_delegates_to_private_compute_loss():
    assert parameters(DPOTrainer._compute_loss) == ["self", "model", "inputs", "return_outputs"]
    seen = []
    stand_in = types.SimpleNamespace(_compute_loss=lambda *a: seen.append(a) or "loss")
    assert DPOTrainer.compute_loss(stand_in, "model", "inputs") == "loss"
    assert seen == [("model", "inputs", False)]


def test_dpo_init_runs_the_overridable_reference_precompute():
    assert parameters(DPOTrainer._precompute_ref_logps) == ["self", "dataset", "name", "batch_size"]
    assert calls(DPOTrainer.__init__, "_precompute_ref_logps")


def test_dpo_prepare_dataset_tokenises_with_a_stand_in_trainer():
    """ches.tokenize_pairs' call: unbound, a stand-in with only ``_tokenizer``, args with three fields."""
    assert parameters(DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    tokenizer = testing.tiny_tokenizer()
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    stand_in = types.SimpleNamespace(_tokenizer=tokenizer)
    out = DPOTrainer._prepare_dataset(stand_in, Dataset.from_list(PAIRS[:1]), tokenizer, args, "contract")
    row = out[0]
    assert row["prompt_ids"] == tokenizer(PAIRS[0]["prompt"])["input_ids"]
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id  # EOS appended from stand_in._tokenizer
    assert row["rejected_ids"][-1] == tokenizer.eos_token_id


def test_dpo_trainer_attributes_tokenizer_metrics_and_tags(dpo_trainer):
    trainer, tokenizer = dpo_trainer
    assert trainer._tokenizer is tokenizer
    assert isinstance(DPOTrainer._tag_names, list) and isinstance(DPOTrainer._name, str)
    assert set(trainer._metrics) == {"train", "eval"}
    assert all(isinstance(buffer, defaultdict) for buffer in trainer._metrics.values())
    trainer.model.train()
    trainer._metrics["train"]["contract/probe"].extend([1.0, 3.0])
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["contract/probe"] == 2.0  # averaged into the next log entry...
    assert not trainer._metrics["train"]  # ...and cleared


def test_dpo_non_model_keys_match_cdlm_copy():
    """cdlm filters model kwargs exactly as TRL's ``_compute_loss`` / ``compute_ref_log_probs`` do."""
    from cdlm.alignment.preference.trainer import _NON_MODEL_KEYS

    for function in (DPOTrainer._compute_loss, DPOTrainer.compute_ref_log_probs):
        tree = ast.parse(_dedented(function))
        literals = [
            {element.value for element in node.value.elts}
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_non_model_keys" for t in node.targets)
            and isinstance(node.value, ast.Set)
        ]
        assert literals == [set(_NON_MODEL_KEYS)], (function.__qualname__, literals)


def test_fused_lm_head_returns_per_token_log_probs_at_labelled_positions():
    """``model(..., labels=labels, fused_lm_head=True).log_probs`` after DPOTrainer's ``add_fused_lm_head``."""
    from trl.trainer.utils import add_fused_lm_head

    model = testing.tiny_llama(seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = ids.masked_fill(torch.tensor([[True, True, False, False, False]]), -100)
    with torch.no_grad():
        logits = model(ids).logits
        add_fused_lm_head(model)
        log_probs = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert log_probs.shape == (1, 4)
    assert log_probs[0, 0] == 0  # label -100: nothing computed
    torch.testing.assert_close(log_probs[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- transformers Trainer


def test_trainer_save_and_resume_hooks():
    assert parameters(Trainer._save) == ["self", "output_dir", "state_dict"]
    assert inspect.signature(Trainer._save).parameters["output_dir"].default is None
    assert calls(Trainer.save_model, "_save")
    assert parameters(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert calls(Trainer.train, "_load_from_checkpoint") or calls(
        Trainer._inner_training_loop, "_load_from_checkpoint"
    )


def test_trainer_prepare_inputs_moves_a_batch_to_the_device(dpo_trainer):
    trainer, _ = dpo_trainer
    assert parameters(Trainer._prepare_inputs) == ["self", "inputs"]
    batch = trainer._prepare_inputs({"input_ids": torch.tensor([[1, 2]]), "note": "kept"})
    assert batch["input_ids"].device == trainer.args.device
    assert batch["note"] == "kept"


def test_trainer_signature_columns_hook_decides_the_kept_columns():
    assert parameters(Trainer._set_signature_columns_if_needed) == ["self"]
    stand_in = types.SimpleNamespace(
        args=types.SimpleNamespace(remove_unused_columns=True),
        _signature_columns=None,
        model=torch.nn.Linear(1, 1),
    )
    stand_in._set_signature_columns_if_needed = lambda: setattr(stand_in, "_signature_columns", ["keep"])
    collator = Trainer._get_collator_with_removed_columns(stand_in, lambda features: features)
    assert collator([{"keep": 1, "drop": 2}]) == [{"keep": 1}]


def test_trainer_gradient_accumulation_attributes():
    """DistiLLM2Trainer returns a micro-batch mean: it sets both so Trainer divides by the accumulation steps."""
    assert "loss_is_scaled_for_ga" in vars(Trainer) and Trainer.loss_is_scaled_for_ga is None
    source = _dedented(Trainer.training_step)
    assert "self.loss_is_scaled_for_ga" in source and "self.model_accepts_loss_kwargs" in source


# ---------------------------------------------------------------------------------------------- generation / config


def test_generate_hands_custom_generate_the_pad_token_tensor():
    model = testing.tiny_llama(seed=0).eval()
    seen = {}

    def probe(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False, **kw):
        seen["pad"] = generation_config._pad_token_tensor
        return input_ids

    model.generate(torch.tensor([[5, 6]]), custom_generate=probe, max_new_tokens=1, do_sample=False, pad_token_id=3)
    assert isinstance(seen["pad"], torch.Tensor) and int(seen["pad"]) == 3


def test_config_attention_implementation_and_source_path():
    model = testing.tiny_llama(seed=0)
    assert model.config._attn_implementation in ("eager", "sdpa")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    config = PretrainedConfig(name_or_path="/some/folder")
    assert config._name_or_path == config.name_or_path == "/some/folder"


# ---------------------------------------------------------------------------------------------- deprecations


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_deprecations_attributed_to_cdlm_fail_and_upstream_ones_stay_visible(category):
    """pyproject's filterwarnings: a deprecation attributed to a cdlm module (its own, or upstream's with a stacklevel
    pointing at a cdlm call site) is an error; one attributed to upstream's own code is only reported."""
    code = "import warnings\nwarnings.warn(message, category)"
    with pytest.raises(category):
        exec(code, {"__name__": "cdlm.decoding.example", "message": f"cdlm {category.__name__}", "category": category})
    with warnings.catch_warnings(record=True) as caught:  # keeps the active filters, records instead of printing
        exec(code, {"__name__": "transformers.example", "message": f"up {category.__name__}", "category": category})
        exec(code, {"__name__": "cdlmx.example", "message": f"near {category.__name__}", "category": category})
    assert [str(w.message) for w in caught] == [f"up {category.__name__}", f"near {category.__name__}"]
