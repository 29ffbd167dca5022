"""DistiLLM2Trainer on tiny models: its loss against a full-logits oracle, training, LoRA, vocab checks."""

from __future__ import annotations

import copy

import pytest
import torch

from cdlm import testing
from cdlm.alignment.distill.config import DistiLLM2Config
from cdlm.alignment.distill.dataset import DistiLLM2Collator
from cdlm.alignment.distill.losses import adaptive_alpha, forward_kl, likelihood_gap, skew_kl, skew_reverse_kl
from cdlm.alignment.distill.metrics import distillation_metrics
from cdlm.alignment.distill.pairs import PairGenerationSettings, generate_pairs
from cdlm.alignment.distill.trainer import DistiLLM2Trainer
from cdlm.models.amateur import TokenizerMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "What is 2+2?",
    "Tell me about the fox.",
    "How do I bake bread?",
    "Count to five.",
    "Name a colour.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def tok():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tok):
    teacher = testing.tiny_llama(seed=0)
    student = testing.tiny_llama(seed=1, hidden_size=32, num_layers=2)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    settings = PairGenerationSettings(teacher="tiny-teacher", student="tiny-student", max_new_tokens=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate_pairs(
            PROMPTS, teacher=teacher, student=student, tokenizer=tok, output=path, settings=settings, batch_size=3
        )
    finally:
        torch.set_num_threads(threads)


def _config(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3,
        per_device_eval_batch_size=3,
        learning_rate=5e-3,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        seed=0,
    )
    base.update(kwargs)
    return DistiLLM2Config(**base)


def _models():
    return testing.tiny_llama(seed=0), testing.tiny_llama(seed=1, hidden_size=32, num_layers=2)


def _oracle_loss(student, teacher, batch, loss_type, alpha, beta, adaptive=False, alpha_min=0.01):
    """Full (batch, seq, vocab) logits, shifted by hand: the straightforward computation."""
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = (comp[:, 1:] * mask[:, 1:]).float()
    labels = ids[:, 1:]
    n = ids.shape[0] // 2

    def seq_mean(values, rows):
        return (values[rows] * target[rows]).sum(-1) / target[rows].sum(-1)

    def logp(logits):
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)

    chosen, rejected = slice(0, n), slice(n, 2 * n)
    a_c = a_r = alpha
    if adaptive:
        s_lp, t_lp = logp(s_logits.detach()), logp(t_logits)
        gap_c = likelihood_gap(seq_mean(t_lp, chosen), seq_mean(s_lp, chosen))
        gap_r = likelihood_gap(seq_mean(s_lp, rejected), seq_mean(t_lp, rejected))
        anchor_c = likelihood_gap(batch["chosen_teacher_logp"], batch["chosen_student_logp"])
        anchor_r = likelihood_gap(batch["rejected_student_logp"], batch["rejected_teacher_logp"])
        a_c = adaptive_alpha(gap_c, anchor_c, alpha, alpha_min)[:, None]
        a_r = adaptive_alpha(gap_r, anchor_r, alpha, alpha_min)[:, None]
    if loss_type == "fkl":
        return seq_mean(forward_kl(t_logits, s_logits), chosen).mean()
    skl = ((skew_kl(t_logits[chosen], s_logits[chosen], a_c) * target[chosen]).sum(-1) / target[chosen].sum(-1)).mean()
    srkl = (
        (skew_reverse_kl(t_logits[rejected], s_logits[rejected], a_r) * target[rejected]).sum(-1)
        / target[rejected].sum(-1)
    ).mean()
    return (1 - beta) * skl + beta * srkl


@pytest.mark.parametrize(
    "loss_type,beta,adaptive",
    [
        ("distillm2", 0.5, False),
        ("distillm2", 0.3, True),
        ("cald", 0.9, False),
        ("fkl", 0.5, False),
        ("srkl", 0.5, False),
    ],
)
def test_trainer_loss_matches_full_logits_oracle(tmp_path, tok, pairs, loss_type, beta, adaptive):
    teacher, student = _models()
    config = _config(
        tmp_path, loss_type=loss_type, beta=beta, adaptive_alpha=adaptive, alpha=0.2, chunk_size=4, max_steps=1
    )
    rows = copy.deepcopy(pairs[:3])
    if adaptive:  # anchors that differ from the current gaps, so alpha really varies per sample
        for row, shift in zip(rows, (0.0, -0.3, 0.4)):
            row["chosen_student_logp"] += shift
    trainer = DistiLLM2Trainer(student, teacher, args=config, train_dataset=rows, processing_class=tok)
    batch = DistiLLM2Collator(tok.pad_token_id)(rows)
    student.train()
    loss = trainer.compute_loss(student, batch)
    effective_beta = {"cald": 0.5, "srkl": 1.0}.get(loss_type, beta)
    expected = _oracle_loss(student, teacher, batch, loss_type, 0.2, effective_beta, adaptive=adaptive)
    torch.testing.assert_close(loss, expected.float(), atol=2e-5, rtol=2e-5)
    # the gradient too
    loss.backward()
    grad = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    _oracle_loss(student, teacher, batch, loss_type, 0.2, effective_beta, adaptive=adaptive).backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(grad[name], param.grad, atol=2e-5, rtol=1e-3)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("loss_type", ["distillm2", "fkl"])
def test_training_brings_the_student_closer_to_the_teacher(tmp_path, tok, pairs, loss_type):
    teacher, student = _models()
    config = _config(
        tmp_path, loss_type=loss_type, max_steps=12, learning_rate=1e-2, beta_schedule="linear", adaptive_alpha=True
    )
    before = distillation_metrics(student, teacher, pairs, pad_token_id=tok.pad_token_id)
    trainer = DistiLLM2Trainer(student, teacher, args=config, train_dataset=pairs, processing_class=tok)
    trainer.train()
    after = distillation_metrics(student, teacher, pairs, pad_token_id=tok.pad_token_id)
    assert after["kl_teacher_responses"] < 0.8 * before["kl_teacher_responses"]
    assert after["student_logp_teacher_responses"] > before["student_logp_teacher_responses"]
    assert after["teacher_logp_teacher_responses"] == pytest.approx(before["teacher_logp_teacher_responses"])
    logged = [entry for entry in trainer.state.log_history if "beta" in entry]
    if loss_type == "distillm2":
        betas = [entry["beta"] for entry in logged]
        assert betas == sorted(betas) and betas[-1] > betas[0]  # the linear schedule ran
        assert any("alpha/chosen" in entry for entry in logged)


def test_lora_trains_only_the_adapter(tmp_path, tok, pairs):
    from peft import LoraConfig

    teacher, student = _models()
    original = {n: p.detach().clone() for n, p in student.named_parameters()}
    config = _config(tmp_path, max_steps=3, learning_rate=5e-2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DistiLLM2Trainer(
        student, teacher, args=config, train_dataset=pairs, processing_class=tok, peft_config=peft_config
    )
    trainer.train()
    merged = trainer.model.merge_and_unload()
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, original[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)


def test_padded_teacher_head_uses_the_common_vocabulary(tmp_path, tok, pairs):
    teacher, student = _models()
    padded = copy.deepcopy(teacher)
    padded.resize_token_embeddings(448)  # lm_head padded past the tokenizer, as many checkpoints are
    rows = pairs[:3]
    batch = DistiLLM2Collator(tok.pad_token_id)(rows)
    losses = []
    for t in (teacher, padded):
        trainer = DistiLLM2Trainer(
            copy.deepcopy(student), t, args=_config(tmp_path, max_steps=1), train_dataset=rows, processing_class=tok
        )
        assert trainer.vocab_size == 384
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_vocabulary_mismatches_are_clear_errors(tmp_path, tok, pairs):
    teacher, _ = _models()
    small = testing.tiny_llama(seed=2, vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match="tokenizer has 384 tokens"):
        DistiLLM2Trainer(small, teacher, args=_config(tmp_path), train_dataset=pairs, processing_class=tok)
    other = testing.tiny_tokenizer(vocab_size=320)
    with pytest.raises(TokenizerMismatchError, match="teacher"):
        DistiLLM2Trainer(
            testing.tiny_llama(seed=1),
            teacher,
            args=_config(tmp_path),
            train_dataset=pairs,
            processing_class=tok,
            teacher_processing_class=other,
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"loss_type": "jsd"}, "loss_type"),
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"adaptive_alpha": True, "alpha_min": 0.5}, "alpha_min"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kwargs)


def test_empty_or_malformed_datasets_are_rejected(tmp_path, tok, pairs):
    teacher, student = _models()
    with pytest.raises(ValueError, match="empty"):
        DistiLLM2Trainer(student, teacher, args=_config(tmp_path), train_dataset=[], processing_class=tok)
    with pytest.raises(ValueError, match="missing"):
        DistiLLM2Trainer(
            student, teacher, args=_config(tmp_path), train_dataset=[{"prompt": "x"}], processing_class=tok
        )


def test_text_rows_are_tokenised_with_eos(tmp_path, tok):
    teacher, student = _models()
    rows = [{"prompt": "Question: what is 2+2?", "chosen": " 4", "rejected": " 5"}] * 3
    trainer = DistiLLM2Trainer(
        student, teacher, args=_config(tmp_path, max_steps=1), train_dataset=rows, processing_class=tok
    )
    row = trainer.train_dataset[0]
    assert row["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["chosen_ids"][:-1]) == " 4"
    trainer.train()


def test_on_policy_resampling_replaces_student_responses(tmp_path, tok, pairs):
    teacher, student = _models()
    config = _config(
        tmp_path, num_train_epochs=2, resample_student_every_epoch=True, resample_max_new_tokens=6, adaptive_alpha=True
    )
    trainer = DistiLLM2Trainer(student, teacher, args=config, train_dataset=copy.deepcopy(pairs), processing_class=tok)
    before = [list(r["rejected_ids"]) for r in trainer.train_dataset.rows]
    trainer.train()
    after = [r["rejected_ids"] for r in trainer.train_dataset.rows]
    assert after != before
    assert all(len(ids) <= 6 for ids in after)
    assert all("rejected_teacher_logp" in r for r in trainer.train_dataset.rows)


def test_head_of_a_bf16_model_accepts_float32_hidden_states():
    """Mixed precision hands float32 hidden states to a bf16 head; the logits must equal the bf16 head's own."""
    from cdlm.alignment.distill.trainer import _logits_fn

    model = testing.tiny_llama(0).to(torch.bfloat16)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vocab = model.config.vocab_size - 3
    logits = _logits_fn(model, vocab)(hidden)
    expected = model.get_output_embeddings()(hidden.to(torch.bfloat16))[:, :vocab]
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, expected)
