"""Contrastive input decoding (CID; Yona, Aharoni & Geva 2023, arXiv 2305.07378) as a logits processor.

One model, two inputs: the regular input ``x`` and a contrastive input ``x'`` (e.g. the same
question with one demographic word changed, or the instruction without its key detail). The
output should be likely given ``x`` and unlikely given ``x'``:

    score(v) = log p(v | x, y_<t) - lambda * log p(v | x', y_<t)   on V_head of p(. | x), -inf elsewhere

with ``V_head = {v : p(v | x, y_<t) >= alpha * max_w p(w | x, y_<t)}``. ``lambda = 0`` is regular
decoding on ``x``; larger lambda pushes harder away from what ``x'`` would produce.

``generate()`` runs the model on ``x``; the processor runs the same model on ``x'`` followed by
the tokens generated so far, with its own KV cache (``cdlm.decoding.branch``), so the cost
is a second forward per step on the contrastive branch. Batches of (x, x') pairs may have different
lengths on either side (both left padded); beam search and sampling work as for any processor.

Example (a tiny in-code model from ``cdlm.testing``):

>>> from transformers import LogitsProcessorList
>>> from cdlm import testing
>>> model, tokenizer = testing.tiny_llama(seed=0), testing.tiny_tokenizer()
>>> x = tokenizer(["Write a short poem about the sea."], return_tensors="pt")
>>> x_prime = tokenizer(["Write a short poem."], return_tensors="pt")
>>> cid = ContrastiveInputLogitsProcessor(model, x_prime["input_ids"], x_prime["attention_mask"], cid_lambda=0.5)
>>> out = model.generate(**x, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([cid]))
>>> out.shape[0], cid.branch.recomputations  # one row; the contrastive branch's cache was reused every step
(1, 0)
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, PreTrainedModel

from cdlm.decoding.branch import IncrementalBranch
from cdlm.decoding.contrast import DEFAULT_ALPHA, DEFAULT_CID_LAMBDA, ContrastSettings
from cdlm.decoding.methods import ContrastiveInputMethod  # noqa: F401  (the registry's ``cid``; lives there, light)


class ContrastiveInputLogitsProcessor(LogitsProcessor):
    """Contrastive input decoding: favour tokens likely under ``x`` and unlikely under ``x'``.

    Args:
        model: the model passed to ``generate()`` (the contrastive branch runs the same weights).
        contrastive_input_ids: (batch, length') left-padded token ids of ``x'``, one row per input.
        contrastive_attention_mask: its mask; inferred from leading pad tokens when omitted.
        cid_lambda: contrast strength lambda >= 0 (0: regular decoding on ``x``).
        alpha: plausibility threshold in (0, 1] on ``p(. | x)``.
        pad_token_id: defaults to ``model.generation_config.pad_token_id``.
        special_ids: ids (EOS) the contrast may not promote past the expert's first choice; empty: the paper's rule.

    The batch size must equal the ``input_ids`` batch given to ``generate()``. Under beam search
    (or ``num_return_sequences``) each contrastive row is repeated like its input row. The processor
    keeps a KV cache per generation, hence ``supports_continuous_batching = False``. The contrastive
    inputs belong to the batch of the first ``generate()`` call: reusing the processor on other prompts
    raises ``ValueError`` (create one per call); a right-padded contrastive mask is refused.
    """

    supports_continuous_batching = False

    def __init__(
        self,
        model: PreTrainedModel,
        contrastive_input_ids: torch.Tensor,
        contrastive_attention_mask: torch.Tensor | None = None,
        *,
        cid_lambda: float = DEFAULT_CID_LAMBDA,
        alpha: float = DEFAULT_ALPHA,
        pad_token_id: int | None = None,
        special_ids: Sequence[int] = (),
    ):
        self.settings = ContrastSettings.for_cid(alpha=alpha, cid_lambda=cid_lambda).forbidding_promotion_of(
            special_ids
        )
        self.cid_lambda, self.alpha = self.settings.weight, self.settings.alpha
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

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.settings.is_identity_contrast:  # regular decoding: the contrastive branch changes nothing
            return self.settings.apply(scores, scores)
        return self.settings.apply(scores, self.branch.next_logits(input_ids))
