"""Log-likelihood of continuations given a context, with the context computed once per example.

lm-eval scores each (context, choice) pair with its own forward over context + choice, so a 4-way
HellaSwag item costs 4 context passes, and it takes a log-softmax over every position. Here:

* **Packed** (the default path): one row per example holding the context followed by every choice
  (``[context] [choice_1[:-1]] [choice_2[:-1]] ...``), with a 4-D attention mask in which each
  choice sees the context and its own earlier tokens only, and position ids that restart after
  the context for every choice. One forward per batch, no cache, no fan-out, no padding inside an
  example; the LM head runs only on the positions that predict a choice token. On HellaSwag this
  processes about half of lm-eval's tokens.
* **Two-pass** (fallback when a packed row would be longer than the model's sliding window, or the
  attention implementation cannot take a custom mask): every context goes through the model once
  (cached keys/values), the cache is fanned out to the example's choices with ``reorder_cache``, and
  all choices are scored in one more pass over ``[last context token] + choice[:-1]``.

The token sequences are exactly lm-eval's (``_encode_pair``: trailing spaces of the context move to
the continuation, the continuation ids are the tail of the encoded ``context + continuation`` after
``len(encode(context))``), so the log-likelihoods agree with lm-eval's to float tolerance (see
``benchmarks/lm_eval_agreement.py``).

Contrastive scoring (O'Brien & Lewis 2023) subtracts ``beta`` times an amateur's log-likelihood of
the same tokens. An early-exit amateur costs nothing extra: its hidden states are captured from the
expert's own forward (``EarlyExitAmateur.capture``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from cdlm.models.lm_head import head_logits


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


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """lm-eval 0.4.x ``_encode_pair`` for causal models with the tokenizer's default special tokens.

    An empty context is replaced by the model's prefix token (BOS, else EOS), as lm-eval does.
    ``add_special_tokens=False`` for chat-rendered text, whose template already wrote them.
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    context_ids = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    return context_ids, whole[len(context_ids) :]


def encode_request(
    tokenizer: PreTrainedTokenizerBase, context: str, continuations: Sequence[str], add_special_tokens: bool = True
) -> EncodedRequest:
    pairs = [encode_pair(tokenizer, context, c, add_special_tokens) for c in continuations]
    contexts = {tuple(p[0]) for p in pairs}
    if len(contexts) != 1:  # cannot happen: the context encoding does not depend on the continuation
        raise AssertionError("context encodings differ between continuations")
    for index, (_, ids) in enumerate(pairs):
        if not ids:
            raise ValueError(f"continuation {index} ({continuations[index]!r}) encodes to no tokens")
    return EncodedRequest(pairs[0][0], [ids for _, ids in pairs])


def check_fits_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[tuple[str, Sequence[str]]],
    *,
    add_special_tokens: bool = True,
    what: str = "request",
    context_name: str = "context",
) -> None:
    """Refuse a (context, continuations) group longer than the model's context (``max_position_embeddings``):
    positions past it give log-likelihoods of no meaning. The length is what every scorer feeds for the longest
    continuation: ``len(encode(context + continuation))``, or 1 + the continuation's tokens for an empty context
    (``encode_pair``). ``what`` and ``context_name`` word the message (``"gsm8k example"``, ``"context"``)."""
    from cdlm.models.prompts import context_length

    limit = context_length(model)
    if limit is None:
        return
    texts = [context + continuation for context, continuations in groups for continuation in continuations]
    lengths = iter(tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else [])
    for index, (context, continuations) in enumerate(groups):
        longest = max((len(next(lengths)) + (0 if context else 1) for _ in continuations), default=0)
        if longest > limit:
            raise ValueError(
                f"{what} {index}: {context_name} + longest continuation is {longest} tokens, more than the model's "
                f"context of {limit}; scoring it would use positions the model has no meaning for: leave it out"
            )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _packed_lengths(request: EncodedRequest) -> int:
    return len(request.context) + sum(len(c) - 1 for c in request.continuations)


def can_pack(model: PreTrainedModel, requests: Sequence[EncodedRequest]) -> bool:
    """Whether ``score_batch_packed`` computes exactly what separate forwards would.

    A custom 4-D mask replaces the model's own mask on every layer, so sliding-window layers would
    see the full row: that is exact only while every (context + choice) fits in the window.
    """
    if getattr(model.config, "_attn_implementation", None) not in ("eager", "sdpa") or not hasattr(
        model, "get_decoder"
    ):
        return False
    window = getattr(model.config, "sliding_window", None)
    longest = max(len(r.context) + max(map(len, r.continuations)) for r in requests)
    return window is None or longest <= window


def _packed_layout(requests: Sequence[EncodedRequest], pad_id: int):
    """Token ids, 4-D additive mask inputs (segment ids), position ids and, per choice token, the row
    position whose output predicts it; see the module docstring for the row layout."""
    width = max(map(_packed_lengths, requests))
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    segment = torch.full((len(requests), width), -1, dtype=torch.long)  # -1 pad, 0 context, j + 1 choice j
    positions = torch.zeros((len(requests), width), dtype=torch.long)
    rows, predictors, targets, lengths = [], [], [], []
    for row, request in enumerate(requests):
        n = len(request.context)
        ids[row, :n] = torch.tensor(request.context)
        segment[row, :n] = 0
        positions[row, :n] = torch.arange(n)
        start = n
        for j, choice in enumerate(request.continuations):
            body = choice[:-1]
            ids[row, start : start + len(body)] = torch.tensor(body, dtype=torch.long)
            segment[row, start : start + len(body)] = j + 1
            positions[row, start : start + len(body)] = n + torch.arange(len(body))
            # choice[0] is predicted by the last context token, choice[t] by the row slot of choice[t - 1].
            predictors += [n - 1] + list(range(start, start + len(body)))
            rows += [row] * len(choice)
            targets += choice
            lengths.append(len(choice))
            start += len(body)
    return ids, segment, positions, torch.tensor(rows), torch.tensor(predictors), torch.tensor(targets), lengths


def _segment_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L) additive mask: a query sees earlier context slots and earlier slots of its own choice."""
    length = segment.shape[1]
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool)  # padding slots see themselves: no all-masked softmax rows
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def _captured_exit_states(early_exit) -> contextlib.AbstractContextManager:
    """The early-exit amateur's hidden states recorded during the block's forwards (``None`` without one)."""
    return early_exit.capture() if early_exit is not None else contextlib.nullcontext(None)


def _sum_per_choice(logits: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> list[tuple[float, bool]]:
    """(log-likelihood, all-greedy) per choice from one logits row per choice token."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy = logits.argmax(-1) == targets
    out, start = [], 0
    for length in lengths:
        out.append((picked[start : start + length].sum().item(), bool(greedy[start : start + length].all().item())))
        start += length
    return out


@torch.inference_mode()
def score_batch_packed(
    model: PreTrainedModel,
    requests: Sequence[EncodedRequest],
    pad_id: int,
    *,
    early_exit=None,
) -> tuple[list[list[ChoiceScore]], list[list[ChoiceScore]] | None]:
    """Score every choice of every request in one forward over packed rows (see the module docstring).

    Returns expert scores and, when ``early_exit`` (an ``EarlyExitAmateur`` of ``model``) is given,
    the amateur's scores of the same tokens read off the same forward pass.
    """
    device = model.device
    ids, segment, positions, rows, predictors, targets, lengths = _packed_layout(requests, pad_id)
    mask = _segment_mask(segment, model.dtype)
    with _captured_exit_states(early_exit) as captured:
        hidden = model.get_decoder()(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
        ).last_hidden_state
        rows, predictors, targets = rows.to(device), predictors.to(device), targets.to(device)
        expert_flat = _sum_per_choice(head_logits(model, hidden[rows, predictors]), targets, lengths)
        amateur_flat = None
        if captured is not None:
            exit_hidden = captured.pop()
            amateur_flat = _sum_per_choice(
                early_exit.logits_from_hidden(exit_hidden[rows, predictors]), targets, lengths
            )
    return _regroup(requests, expert_flat, lengths), (
        _regroup(requests, amateur_flat, lengths) if amateur_flat else None
    )


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
    with _captured_exit_states(early_exit) as captured:
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if captured is not None:
            captured.clear()
        # Fan the cache out: one row per (request, continuation).
        owners = [row for row, r in enumerate(requests) for _ in r.continuations]
        cache.reorder_cache(torch.tensor(owners, device=device))  # type: ignore[arg-type]
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
        logits = model(
            input_ids=inputs, attention_mask=full_mask, position_ids=positions2, past_key_values=cache, use_cache=True
        ).logits
        lengths = [len(cont) for _, cont in rows]
        real = cont_mask.bool()  # row-major, so choice tokens come out in order, choice after choice
        expert_flat = _sum_per_choice(logits[real], targets[real], lengths)
        amateur_flat = None
        if captured is not None:
            hidden = captured.pop()
            amateur_flat = _sum_per_choice(early_exit.logits_from_hidden(hidden[real]), targets[real], lengths)
    return _regroup(requests, expert_flat, lengths), (
        _regroup(requests, amateur_flat, lengths) if amateur_flat else None
    )


@torch.inference_mode()
def score_batch_naive(
    model: PreTrainedModel, requests: Sequence[EncodedRequest], pad_id: int, *, early_exit=None
) -> tuple[list[list[ChoiceScore]], list[list[ChoiceScore]] | None]:
    """Reference scorer: one full forward per (context, continuation), as lm-eval computes it."""
    expert_flat, amateur_flat, lengths = [], [], []
    for request in requests:
        for cont in request.continuations:
            sequence = torch.tensor([request.context + cont], device=model.device)
            target = torch.tensor(cont, device=model.device)
            with _captured_exit_states(early_exit) as captured:
                logits = model(input_ids=sequence).logits[0, len(request.context) - 1 : -1]
                expert_flat += _sum_per_choice(logits, target, [len(cont)])
                if captured is not None:
                    hidden = captured.pop()[0, len(request.context) - 1 : -1]
                    amateur_flat += _sum_per_choice(early_exit.logits_from_hidden(hidden), target, [len(cont)])
            lengths.append(len(cont))
    return _regroup(requests, expert_flat, lengths), (
        _regroup(requests, amateur_flat, lengths) if amateur_flat else None
    )


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
    if not shared_context:
        scorer, size = score_batch_naive, lambda r: len(r.context) + max(map(len, r.continuations))
    elif requests and can_pack(model, requests):
        scorer, size = score_batch_packed, _packed_lengths
    else:
        scorer, size = score_batch_shared, lambda r: len(r.context) + max(map(len, r.continuations))
    order = sorted(range(len(requests)), key=lambda i: -size(requests[i]))
    expert: list = [None] * len(requests)
    amateur: list | None = [None] * len(requests) if early_exit is not None else None
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        e, a = scorer(model, [requests[i] for i in chunk], pad_id, early_exit=early_exit)
        for position, index in enumerate(chunk):
            expert[index] = e[position]
            if amateur is not None and a is not None:
                amateur[index] = a[position]
        done += len(chunk)
        if on_batch is not None:
            on_batch(done, len(requests))
    return expert, amateur


def score_under_rule(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rule,
    requests: Sequence[tuple[str, Sequence[str], str | None]],
    *,
    add_special_tokens: bool = True,
    batch_size: int = 16,
    shared_context: bool = True,
) -> list:
    """Score ``(context, continuations, contrastive_context)`` requests under a ``ScoringRule``.

    The expert scores every continuation; the rule's contrast scores the same continuations with the
    amateur (read off the expert's forward for an early-exit amateur, else a second model on the same
    token ids) or after the contrastive context. Returns one ``LoglikelihoodResponse`` per request.
    """
    from cdlm.eval_harness.task import LoglikelihoodResponse

    if rule.contrast == "contrastive-input" and any(r[2] is None for r in requests):
        raise ValueError(f"scoring rule {rule.name!r} needs a contrastive context for every request")
    kwargs: dict[str, Any] = {"batch_size": batch_size, "shared_context": shared_context}
    encoded = [encode_request(tokenizer, context, conts, add_special_tokens) for context, conts, _ in requests]
    amateur = rule.amateur if rule.contrast == "amateur" else None
    early_exit = amateur if getattr(amateur, "kind", None) == "early-exit" else None
    expert, contrast = score_requests(model, tokenizer, encoded, early_exit=early_exit, **kwargs)
    if amateur is not None and early_exit is None:  # a separate amateur scores the same token sequences
        contrast, _ = score_requests(amateur.model, tokenizer, encoded, **kwargs)
    if rule.contrast == "contrastive-input":
        contrast_encoded = [encode_request(tokenizer, c or "", conts, add_special_tokens) for _, conts, c in requests]
        contrast, _ = score_requests(model, tokenizer, contrast_encoded, **kwargs)
    responses = []
    for position, scores in enumerate(expert):
        expert_ll = [s.loglikelihood for s in scores]
        contrast_ll = [s.loglikelihood for s in contrast[position]] if contrast is not None else None
        responses.append(
            LoglikelihoodResponse(
                scores=rule.combine(expert_ll, contrast_ll),
                expert_loglikelihoods=expert_ll,
                contrast_loglikelihoods=contrast_ll,
                is_greedy=[s.is_greedy for s in scores],
                num_tokens=[s.num_tokens for s in scores],
            )
        )
    return responses
