"""DistiLLM-2 end to end on SmolLM2-135M-Instruct: pairs -> training -> a student loadable as CD amateur."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from cdlm.alignment.distill.config import DistiLLM2Config
from cdlm.alignment.distill.metrics import distillation_metrics
from cdlm.alignment.distill.pairs import PairGenerationSettings, generate_pairs
from cdlm.alignment.distill.trainer import DistiLLM2Trainer
from cdlm.models import load_amateur

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]


def _shallow_student(teacher, layers: int) -> LlamaForCausalLM:
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    student = LlamaForCausalLM(config)
    state = {
        k: v.clone()
        for k, v in teacher.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    student.load_state_dict(state, strict=False)
    return student.float()


def test_pipeline_on_smollm2(smollm2, tmp_path):
    teacher, tok = smollm2.model, smollm2.tokenizer
    student = _shallow_student(teacher, 2)
    prompts = ["What is 3 + 4?", "Name a fruit."]
    settings = PairGenerationSettings(teacher="smollm2", student="smollm2[:2]", max_new_tokens=8)
    pairs = generate_pairs(
        prompts,
        teacher=teacher,
        student=student,
        tokenizer=tok,
        output=tmp_path / "p.jsonl",
        settings=settings,
        batch_size=2,
    )
    assert all(p["chosen_ids"] and p["rejected_ids"] for p in pairs)
    before = distillation_metrics(student, teacher, pairs, pad_token_id=tok.pad_token_id, chunk_size=16)
    config = DistiLLM2Config(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=3e-4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        adaptive_alpha=True,
        chunk_size=16,
    )
    trainer = DistiLLM2Trainer(
        student, teacher, args=config, train_dataset=pairs, processing_class=tok, teacher_processing_class=tok
    )
    assert trainer.vocab_size == 49152
    trainer.train()
    after = distillation_metrics(student, teacher, pairs, pad_token_id=tok.pad_token_id, chunk_size=16)
    assert after["kl_teacher_responses"] < before["kl_teacher_responses"]
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    amateur = load_amateur(str(tmp_path / "student"), smollm2, device="cpu", dtype="float32")
    assert amateur.kind == "separate" and amateur.vocab_size == 49152
    for a, b in zip(amateur.model.parameters(), student.parameters()):
        assert torch.equal(a, b.to(a.dtype))
