"""Held-out teacher-student agreement for DistiLLM-2 (the numbers its benchmarks and CLI report)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel

from cdlm.alignment.distill.dataset import DistiLLM2Collator
from cdlm.alignment.distill.losses import chunked_sequence_stats
from cdlm.alignment.distill.trainer import _logits_fn, _positions


@torch.no_grad()
def distillation_metrics(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    rows: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    vocab_size: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Teacher-student agreement on held-out pairs, token-weighted over all completion tokens.

    ``kl_teacher_responses``: mean per-token KL(p || q) on teacher responses;
    ``student_logp_teacher_responses``: the student's mean log-likelihood per token of those
    responses (and the teacher's own, for reference); ``rkl_student_responses``: mean KL(q || p) on
    the student-response field of the rows (as stored; not regenerated).
    """
    vocab = vocab_size or min(
        student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    )
    collator = DistiLLM2Collator(pad_token_id)
    student_fn, teacher_fn = _logits_fn(student, vocab), _logits_fn(teacher, vocab)
    totals: dict[str, float] = defaultdict(float)
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator(list(rows[start : start + batch_size]))
            pairs = batch["input_ids"].shape[0] // 2
            ids = batch["input_ids"].to(student.device)
            mask = batch["attention_mask"].to(student.device)
            comp = batch["completion_mask"].to(student.device)
            s_hidden = student.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            t_hidden = teacher.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            for side, rows_slice, divergence in (
                ("teacher_responses", slice(0, pairs), "fkl"),
                ("student_responses", slice(pairs, 2 * pairs), "rkl"),
            ):
                r, c, labels = _positions(ids, mask, comp, rows_slice)
                stats = chunked_sequence_stats(
                    student_hidden=s_hidden[rows_slice][r, c],
                    teacher_hidden=t_hidden[rows_slice][r, c],
                    labels=labels,
                    seq_index=r,
                    num_sequences=pairs,
                    student_logits_fn=student_fn,
                    teacher_logits_fn=teacher_fn,
                    divergence=divergence,
                    chunk_size=chunk_size,
                )
                totals[f"{divergence}_{side}"] += stats["divergence"].sum().item()
                totals[f"student_logp_{side}"] += stats["student_logp"].sum().item()
                totals[f"teacher_logp_{side}"] += stats["teacher_logp"].sum().item()
                totals[f"tokens_{side}"] += stats["count"].sum().item()
    finally:
        student.train(was_training)
    result = {}
    for key, value in totals.items():
        if key.startswith("tokens_"):
            result[key] = int(value)
        else:
            side = "teacher_responses" if key.endswith("teacher_responses") else "student_responses"
            result[key.replace("fkl_", "kl_")] = value / max(totals[f"tokens_{side}"], 1.0)
    return result
