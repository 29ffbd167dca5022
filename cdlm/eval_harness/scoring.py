"""Log-likelihood of continuations given a context, with the context computed once per example.

lm-eval scores each (context, choice) pair with its own forward over context + choice, so a 4-way
HellaSwag item costs 4 context passes. Here every example's context goes through the model once
(pass 1, cached keys/values, only the last position's logits kept), the cache is fanned out to the
example's choices with ``reorder_cache`` (an index-select on the batch dimension, no recompute), and
all choices of all examples in the batch are scored in one more pass (pass 2) over just
``[last context token] + choice[:-1]``. The token sequences are exactly lm-eval's (``_encode_pair``:
trailing spaces of the context move to the continuation, the continuation ids are the tail of the
encoded ``context + continuation`` after ``len(encode(context))``), so the log-likelihoods agree with
lm-eval's to float tolerance (see ``benchmarks/lm_eval_agreement.py``).

Contrastive scoring (O'Brien & Lewis 2023) subtracts ``beta`` times an amateur's log-likelihood of
the same tokens. An early-exit amateur costs nothing extra: its hidden states are captured from the
expert's own pass 2 (``EarlyExitAmateur.capture``), which sees the cached context of the shared layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class EncodedRequest:
    """One example: its context ids and one id list per continuation (lm-eval's token sequences)."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class ChoiceScore:
    loglikelihood: float
    is_greedy: bool  # every continuation token is the argmax (lm-eval's second loglikelihood output)
    num_tokens: int


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4.x ``_encode_pair`` for causal models with the tokenizer's default special tokens.

    An empty context is replaced by the model's prefix token (BOS, else EOS), as lm-eval does.
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def encode_request(tokenizer: PreTrainedTokenizerBase, context: str, continuations: Sequence[str]) -> EncodedRequest:
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    contexts = {tuple(p[0]) for p in pairs}
    if len(contexts) != 1:  # cannot happen: the context encoding does not depend on the continuation
        raise AssertionError("context encodings differ between continuations")
    for index, (_, ids) in enumerate(pairs):
        if not ids:
            raise ValueError(f"continuation {index} ({continuations[index]!r}) encodes to no tokens")
    return EncodedRequest(pairs[0][0], [ids for _, ids in pairs])


AmateurScorer = Callable[[torch.Tensor], torch.Tensor]


def _gather(logits: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> list[tuple[float, bool]]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy = logits.argmax(-1) == targets
    out = []
    for row, length in enumerate(lengths):
        out.append((picked[row, :length].sum().item(), bool(greedy[row, :length].all().item())))
    return out


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.inference_mode()
def score_batch_shared(
    model: PreTrainedModel,
    requests: Sequence[EncodedRequest],
    pad_id: int,
    *,
    early_exit=None,
) -> tuple[list[list[ChoiceScore]], list[list[ChoiceScore]] | None]:
    """Score every continuation of every request with one context pass and one continuation pass.

    Returns expert scores and, when ``early_exit`` (an ``EarlyExitAmateur`` of ``model``) is given,
    the amateur's scores of the same tokens read off the same forward passes.
    """
    device = model.device
    if any(len(r.context) < 2 for r in requests):
        # A one-token context leaves nothing to cache; the naive path handles it exactly.
        return score_batch_naive(model, requests, pad_id, early_exit=early_exit)
    # Pass 1: contexts without their last token, left-padded; only the cache is needed.
    prefixes = [r.context[:-1] for r in requests]
    width = max(map(len, prefixes))
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        ids[row, width - len(prefix) :] = torch.tensor(prefix)
        mask[row, width - len(prefix) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    capture = early_exit.capture() if early_exit is not None else None
    captured = capture.__enter__() if capture is not None else None
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if captured is not None:
            captured.clear()
        # Fan the cache out: one row per (request, continuation).
        owners = [row for row, r in enumerate(requests) for _ in r.continuations]
        cache.reorder_cache(torch.tensor(owners, device=device))
        rows = [(r.context[-1:] + cont[:-1], cont) for r in requests for cont in r.continuations]
        length = max(len(inp) for inp, _ in rows)
        inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
        targets = torch.zeros((len(rows), length), dtype=torch.long)
        cont_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (inp, cont) in enumerate(rows):
            inputs[row, : len(inp)] = torch.tensor(inp)
            targets[row, : len(cont)] = torch.tensor(cont)
            cont_mask[row, : len(inp)] = 1
        inputs, targets, cont_mask = inputs.to(device), targets.to(device), cont_mask.to(device)
        owner_index = torch.tensor(owners, device=device)
        full_mask = torch.cat([mask[owner_index], cont_mask], dim=1)
        start = mask.sum(-1)[owner_index].unsqueeze(-1)
        positions2 = start + torch.arange(length, device=device).unsqueeze(0)
        logits = model(input_ids=inputs, attention_mask=full_mask, position_ids=positions2, past_key_values=cache, use_cache=True).logits
        lengths = [len(cont) for _, cont in rows]
        expert_flat = _gather(logits, targets, lengths)
        amateur_flat = None
        if captured is not None:
            hidden = captured.pop()
            amateur_flat = _gather(early_exit.logits_from_hidden(hidden), targets, lengths)
    finally:
        if capture is not None:
            capture.__exit__(None, None, None)
    return _regroup(requests, expert_flat, lengths), (_regroup(requests, amateur_flat, lengths) if amateur_flat else None)


@torch.inference_mode()
def score_batch_naive(
    model: PreTrainedModel, requests: Sequence[EncodedRequest], pad_id: int, *, early_exit=None
) -> tuple[list[list[ChoiceScore]], list[list[ChoiceScore]] | None]:
    """Reference scorer: one full forward per (context, continuation), as lm-eval computes it."""
    expert_flat, amateur_flat, lengths = [], [], []
    for request in requests:
        for cont in request.continuations:
            sequence = torch.tensor([request.context + cont], device=model.device)
            target = torch.tensor([cont], device=model.device)
            capture = early_exit.capture() if early_exit is not None else None
            captured = capture.__enter__() if capture is not None else None
            try:
                logits = model(input_ids=sequence).logits[:, len(request.context) - 1 : -1]
                expert_flat += _gather(logits, target, [len(cont)])
                if captured is not None:
                    hidden = captured.pop()[:, len(request.context) - 1 : -1]
                    amateur_flat += _gather(early_exit.logits_from_hidden(hidden), target, [len(cont)])
            finally:
                if capture is not None:
                    capture.__exit__(None, None, None)
            lengths.append(len(cont))
    return _regroup(requests, expert_flat, lengths), (_regroup(requests, amateur_flat, lengths) if amateur_flat else None)


def _regroup(requests, flat, lengths) -> list[list[ChoiceScore]]:
    grouped, index = [], 0
    for request in requests:
        scores = []
        for _ in request.continuations:
            ll, greedy = flat[index]
            scores.append(ChoiceScore(ll, greedy, lengths[index]))
            index += 1
        grouped.append(scores)
    return grouped


def score_requests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EncodedRequest],
    *,
    batch_size: int = 16,
    early_exit=None,
    shared_context: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[list[list[ChoiceScore]], list[list[ChoiceScore]] | None]:
    """Score all requests in batches of ``batch_size`` examples, longest first (less padding).

    Results come back in the order of ``requests``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    pad_id = _pad_id(tokenizer)
    scorer = score_batch_shared if shared_context else score_batch_naive
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].context) + max(map(len, requests[i].continuations))))
    expert: list = [None] * len(requests)
    amateur: list | None = [None] * len(requests) if early_exit is not None else None
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        e, a = scorer(model, [requests[i] for i in chunk], pad_id, early_exit=early_exit)
        for position, index in enumerate(chunk):
            expert[index] = e[position]
            if amateur is not None:
                amateur[index] = a[position]
        done += len(chunk)
        if on_batch is not None:
            on_batch(done, len(requests))
    return expert, amateur
