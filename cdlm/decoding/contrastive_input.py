"""Contrastive input decoding (CID; Yona, Aharoni & Geva 2023, arXiv 2305.07378) as a logits processor.

One model, two inputs: the regular input ``x`` and a contrastive input ``x'`` (e.g. the same
question with one demographic word changed, or the instruction without its key detail). The
output should be likely given ``x`` and unlikely given ``x'``:

    score(v) = log p(v | x, y_<t) - lambda * log p(v | x', y_<t)   on V_head of p(. | x), -inf elsewhere

with ``V_head = {v : p(v | x, y_<t) >= alpha * max_w p(w | x, y_<t)}``. ``lambda = 0`` is regular
decoding on ``x``; larger lambda pushes harder away from what ``x'`` would produce.

``generate()`` runs the model on ``x``; the processor runs the same model on ``x'`` followed by
the tokens generated so far, with its own KV cache (``cdlm.decoding._amateur_state``), so the cost
is a second forward per step on the contrastive branch. Batches of (x, x') pairs may have different
lengths on either side (both left padded); beam search and sampling work as for any processor.
"""

from __future__ import annotations

import torch
from transformers import BatchEncoding, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from cdlm.decoding._amateur_state import IncrementalBranch
from cdlm.decoding._contrast import check_alpha, check_non_negative, contrast
from cdlm.decoding.methods import DecodingMethod, Param

DEFAULT_LAMBDA = 0.5
DEFAULT_ALPHA = 0.1


class ContrastiveInputLogitsProcessor(LogitsProcessor):
    """Contrastive input decoding: favour tokens likely under ``x`` and unlikely under ``x'``.

    Args:
        model: the model passed to ``generate()`` (the contrastive branch runs the same weights).
        contrastive_input_ids: (batch, length') left-padded token ids of ``x'``, one row per input.
        contrastive_attention_mask: its mask; inferred from leading pad tokens when omitted.
        cid_lambda: contrast strength lambda >= 0 (0: regular decoding on ``x``).
        alpha: plausibility threshold in (0, 1] on ``p(. | x)``.
        pad_token_id: defaults to ``model.generation_config.pad_token_id``.

    The batch size must equal the ``input_ids`` batch given to ``generate()``. Under beam search
    (or ``num_return_sequences``) each contrastive row is repeated like its input row.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        contrastive_input_ids: torch.Tensor,
        contrastive_attention_mask: torch.Tensor | None = None,
        *,
        cid_lambda: float = DEFAULT_LAMBDA,
        alpha: float = DEFAULT_ALPHA,
        pad_token_id: int | None = None,
    ):
        self.cid_lambda = check_non_negative("lambda (cid_lambda)", cid_lambda)
        self.alpha = check_alpha(alpha)
        if contrastive_input_ids is None or contrastive_input_ids.numel() == 0:
            raise ValueError("contrastive input decoding needs non-empty contrastive_input_ids")
        if pad_token_id is None:
            pad_token_id = model.generation_config.pad_token_id
        self.branch = IncrementalBranch(
            model,
            pad_token_id=pad_token_id,
            branch_input_ids=contrastive_input_ids,
            branch_attention_mask=contrastive_attention_mask,
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cid_lambda == 0.0:  # regular decoding: the contrastive branch would not change anything
            return contrast(scores, scores, alpha=self.alpha, weight=0.0, formulation="li")
        other = self.branch.next_logits(input_ids)
        return contrast(scores, other, alpha=self.alpha, weight=self.cid_lambda, formulation="li")


class ContrastiveInputMethod(DecodingMethod):
    """``cdlm generate --method cid --contrastive-prompt ...``: greedy (or beam) decoding on CID scores."""

    name = "cid"
    description = "contrastive input decoding: likely given the prompt, unlikely given the contrastive prompt"
    needs_contrastive_inputs = True
    params = (
        Param("cid_lambda", float, DEFAULT_LAMBDA, "contrast strength lambda >= 0 (0 = greedy on the prompt)"),
        Param("alpha", float, DEFAULT_ALPHA, "plausibility threshold in (0, 1]: keep tokens with p >= alpha * max p"),
        Param("num_beams", int, 1, "beam search width (1: greedy)"),
    )

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        hp = self.hyperparameters
        check_non_negative("lambda (cid_lambda)", hp["cid_lambda"])
        check_alpha(hp["alpha"])
        if hp["num_beams"] < 1:
            raise ValueError(f"num_beams must be >= 1, got {hp['num_beams']}")

    def generate_kwargs(self, batch: BatchEncoding, contrastive_batch: BatchEncoding | None = None) -> dict:
        if contrastive_batch is None:
            raise ValueError("method 'cid' needs a contrastive input per prompt")
        rows, contrastive_rows = batch["input_ids"].shape[0], contrastive_batch["input_ids"].shape[0]
        if rows != contrastive_rows:
            raise ValueError(f"got {contrastive_rows} contrastive inputs for a batch of {rows} inputs; give one per input")
        hp = self.hyperparameters
        processor = ContrastiveInputLogitsProcessor(
            self.model,
            contrastive_batch["input_ids"],
            contrastive_batch.get("attention_mask"),
            cid_lambda=hp["cid_lambda"],
            alpha=hp["alpha"],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return {"do_sample": False, "num_beams": hp["num_beams"], "logits_processor": LogitsProcessorList([processor])}
