"""A second causal LM that follows ``generate()`` token by token with its own KV cache.

A logits processor only ever sees ``input_ids`` (the expert's sequences so far) and the expert's
scores. Contrastive decoding needs the amateur's next-token logits on the *same* sequences;
contrastive input decoding needs the expert's logits on a *different prompt* followed by the same
generated tokens. ``IncrementalBranch`` serves both: it runs its model on
``branch prompt + tokens generated so far`` and, between calls, works out what changed:

* the usual case (greedy, sampling): every row grew by one token -> feed just that token;
* beam search: rows were reordered, duplicated or dropped -> find each new row's parent among the
  rows the cache holds (by their full token prefix, not by trusting beam indices we are never
  given), reorder the cache, then feed the new token;
* anything else (a row whose prefix is in no cached row, a new ``generate()`` call reusing the
  processor) -> recompute from scratch. The cache is never used for a prefix it does not hold.

Left padding: the branch needs the prompt's attention mask, which ``generate()`` does not give to
processors. Pass it at construction for exactness; otherwise the leading run of ``pad_token_id`` in
each row is taken as padding (right for left-padded batches whose real text never starts with the
pad token). A given mask belongs to the first prompt the branch sees: a later generation from other
prompts (a processor reused on another batch, even of the same shape) raises instead of silently
applying the old batch's mask; the same holds for a branch prompt (CID's contrastive inputs). A
right-padded mask is refused. Generated positions are always attended, as in ``generate()``, and position ids follow
``generate()``'s rule (cumulative sum of the mask minus one).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from cdlm.models.prompts import check_left_padded

# Hash weights < 2**20 and token ids < 2**22 keep each term < 2**42, so sums of up to 2**20 terms
# cannot overflow int64. Matches found by hash are re-checked exactly.
_HASH_BITS = 20
_MAX_HASHED_LENGTH = 2**20


class IncrementalBranch:
    """Next-token logits of ``model`` on (branch prompt + generated tokens), cached incrementally.

    Args:
        model: the causal LM to run (the amateur, or the expert itself for a contrastive input).
        pad_token_id: used to infer left padding when no mask is given.
        prompt_attention_mask: (batch, prompt_len) mask of the prompt ``generate()`` starts from.
        branch_input_ids: the branch's own prompt, (batch, branch_len). ``None`` means the branch
            reads the same prompt as the expert (contrastive decoding).
        branch_attention_mask: mask of ``branch_input_ids`` (inferred from padding when omitted).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        branch_input_ids: torch.Tensor | None = None,
        branch_attention_mask: torch.Tensor | None = None,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.prompt_attention_mask = _check_2d("attention_mask", prompt_attention_mask)
        check_left_padded(prompt_attention_mask)
        check_left_padded(branch_attention_mask, "contrastive attention_mask")
        self.branch_input_ids = _check_2d("contrastive input_ids", branch_input_ids)
        if branch_attention_mask is not None and branch_input_ids is None:
            raise ValueError("a contrastive attention mask was given without contrastive input ids")
        self.branch_attention_mask = _check_2d("contrastive attention_mask", branch_attention_mask)
        if (
            self.branch_attention_mask is not None
            and self.branch_input_ids is not None
            and self.branch_attention_mask.shape != self.branch_input_ids.shape
        ):
            raise ValueError(
                f"contrastive attention_mask has shape {tuple(self.branch_attention_mask.shape)} but contrastive "
                f"input_ids have shape {tuple(self.branch_input_ids.shape)}"
            )
        self._mask_prompt: torch.Tensor | None = None  # the prompt rows prompt_attention_mask was used with
        self._branch_prompt: torch.Tensor | None = None  # the prompt rows branch_input_ids were used with
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.recomputations = 0  # how often the cache could not be reused (for tests and diagnostics)
        self.reorders = 0  # how often rows were reordered/duplicated (beam search)
        self.reset()

    def reset(self) -> None:
        """Forget all state; the next call starts a new generation."""
        self._seen: torch.Tensor | None = None  # expert-side ids the cache covers, (rows, length)
        self._prompt_len = 0
        self._start_ids: torch.Tensor | None = None  # expert-side prompt rows at the start, (rows0, T0)
        self._start_branch_ids: torch.Tensor | None = None  # branch prompt rows at the start
        self._start_branch_mask: torch.Tensor | None = None
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # branch attention mask so far, (rows, branch length)
        self._next_position: torch.Tensor | None = None  # (rows,) position id of the next token
        self._all_attended = True

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ public entry point
    @torch.no_grad()
    def next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) logits of the branch's next token for each row of ``input_ids``."""
        if self._seen is not None:
            seen_len = self._seen.shape[1]
            rows, length = input_ids.shape
            if length > seen_len:
                prefix = input_ids[:, :seen_len]
                if rows == self._seen.shape[0] and torch.equal(prefix, self._seen):
                    return self._extend(input_ids)
                parents = _find_parents(prefix, self._seen)
                if parents is not None:
                    self._reorder(parents)
                    return self._extend(input_ids)
                if length > self._prompt_len and self._start_ids is not None:
                    prompt_parents = _find_parents(input_ids[:, : self._prompt_len], self._start_ids)
                    if prompt_parents is not None:
                        return self._recompute(input_ids, prompt_parents)
        return self._start(input_ids)

    # ------------------------------------------------------------------ state transitions
    def _start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A new generation: ``input_ids`` is the (possibly beam-expanded) prompt."""
        self.reset()
        rows, prompt_len = input_ids.shape
        if self.branch_input_ids is not None:
            # The contrastive inputs belong to the first batch, like a given mask: never pair them with others.
            if self._branch_prompt is None:
                self._branch_prompt = input_ids.clone()
            elif not torch.equal(self._branch_prompt, input_ids):
                raise ValueError(
                    "this contrastive input decoding processor holds the contrastive inputs of another batch (it "
                    "already generated from different prompts); create one processor per generate() call"
                )
        prompt_mask = self._prompt_mask(input_ids)
        if self.branch_input_ids is None:
            branch_ids, branch_mask = input_ids, prompt_mask
        else:
            repeats = _rows_per_prompt(input_ids, self.branch_input_ids.shape[0], "contrastive inputs")
            branch_ids = self.branch_input_ids.to(input_ids.device).repeat_interleave(repeats, dim=0)
            if self.branch_attention_mask is not None:
                branch_mask = self.branch_attention_mask.to(input_ids.device).repeat_interleave(repeats, dim=0)
            else:
                branch_mask = _infer_left_padding(branch_ids, self.pad_token_id)
        self._prompt_len = prompt_len
        self._start_ids = input_ids.clone()
        self._start_branch_ids = branch_ids
        self._start_branch_mask = branch_mask.long()
        return self._prefill(input_ids, branch_ids, branch_mask)

    def _recompute(self, input_ids: torch.Tensor, prompt_parents: torch.Tensor) -> torch.Tensor:
        """Rebuild every row from its branch prompt plus the tokens generated after the prompt."""
        assert self._start_branch_ids is not None and self._start_branch_mask is not None  # set by _start
        self.recomputations += 1
        generated = input_ids[:, self._prompt_len :]
        branch_ids = torch.cat([self._start_branch_ids[prompt_parents], generated], dim=1)
        branch_mask = torch.cat(
            [self._start_branch_mask[prompt_parents], torch.ones_like(generated, dtype=torch.long)], dim=1
        )
        return self._prefill(input_ids, branch_ids, branch_mask)

    def _prefill(self, input_ids: torch.Tensor, branch_ids: torch.Tensor, branch_mask: torch.Tensor) -> torch.Tensor:
        mask = branch_mask.to(self.device).long()
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)
        self._mask = mask
        self._all_attended = bool(mask.all())
        self._next_position = mask.sum(-1)
        self._cache = DynamicCache(config=self.model.config)
        logits = self._forward(branch_ids.to(self.device), positions)
        self._seen = input_ids.clone()
        return logits

    def _reorder(self, parents: torch.Tensor) -> None:
        assert self._cache is not None and self._mask is not None  # set by _prefill
        assert self._next_position is not None and self._seen is not None
        self.reorders += 1
        index = parents.to(self.device)
        self._cache.reorder_cache(index)  # type: ignore[arg-type]  # a long tensor, typed as LongTensor
        self._mask = self._mask.index_select(0, index)
        self._next_position = self._next_position.index_select(0, index)
        self._seen = self._seen.index_select(0, parents)

    def _extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self._seen is not None and self._mask is not None and self._next_position is not None  # _prefill
        new = input_ids[:, self._seen.shape[1] :].to(self.device)
        steps = new.shape[1]
        self._mask = torch.cat([self._mask, torch.ones_like(new, dtype=torch.long)], dim=1)
        positions = self._next_position[:, None] + torch.arange(steps, device=self.device)
        self._next_position = self._next_position + steps
        logits = self._forward(new, positions)
        self._seen = input_ids.clone()
        return logits

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        output = self.model(
            input_ids=ids,
            # An all-ones mask is dropped, as generate() does: attention then takes its fast causal path.
            attention_mask=None if self._all_attended else self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            **kwargs,
        )
        self._cache = output.past_key_values
        return output.logits[:, -1, :]

    def _prompt_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.prompt_attention_mask is None:
            return _infer_left_padding(input_ids, self.pad_token_id)
        mask = self.prompt_attention_mask.to(input_ids.device)
        if mask.shape[1] != input_ids.shape[1]:
            raise ValueError(
                f"the attention_mask given to the processor covers {mask.shape[1]} positions but generate() "
                f"started from {input_ids.shape[1]}; pass the attention_mask of the same batch you generate from"
            )
        repeats = _rows_per_prompt(input_ids, mask.shape[0], "attention_mask")
        if self._mask_prompt is None:
            self._mask_prompt = input_ids.clone()
        elif not torch.equal(self._mask_prompt, input_ids):
            raise ValueError(
                "this processor was given the attention_mask of another batch (it already generated from different "
                "prompts); create one processor per generate() call, or omit attention_mask to infer left padding"
            )
        return mask.repeat_interleave(repeats, dim=0).long()


def _check_2d(name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is not None and tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, length), got shape {tuple(tensor.shape)}")
    return tensor


def _infer_left_padding(ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """1 from each row's first non-pad token on; the leading run of pad tokens is padding."""
    if pad_token_id is None:
        return torch.ones_like(ids, dtype=torch.long)
    return ((ids != pad_token_id).long().cumsum(-1) > 0).long()


def _rows_per_prompt(input_ids: torch.Tensor, batch: int, what: str) -> int:
    """generate() repeats each prompt num_beams (or num_return_sequences) times, consecutively."""
    rows = input_ids.shape[0]
    if batch <= 0 or rows % batch:
        raise ValueError(f"{what} have batch size {batch} but generate() runs {rows} rows; give one per input")
    repeats = rows // batch
    if repeats > 1:
        groups = input_ids.reshape(batch, repeats, -1)
        if not bool((groups == groups[:, :1]).all()):
            raise ValueError(
                f"{what} have batch size {batch} but the inputs have {rows} different rows; give one per input"
            )
    return repeats


def _row_hashes(ids: torch.Tensor) -> torch.Tensor:
    """Two independent 64-bit polynomial-free hashes per row: (rows, 2)."""
    generator = torch.Generator().manual_seed(1234)
    weights = torch.randint(1, 2**_HASH_BITS, (2, ids.shape[1]), generator=generator, dtype=torch.long)
    return (ids.long()[:, None, :] * weights.to(ids.device)[None]).sum(-1)


def _find_parents(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor | None:
    """For each row of ``new``, the index of a row of ``old`` with the same tokens; None if any has none."""
    if new.shape[1] != old.shape[1]:
        return None
    if new.shape[1] > _MAX_HASHED_LENGTH:
        matches = torch.stack([(old == row).all(-1) for row in new])
    else:
        matches = (_row_hashes(new)[:, None, :] == _row_hashes(old)[None, :, :]).all(-1)
    found = matches.any(-1)
    if not bool(found.all()):
        return None
    parents = matches.int().argmax(-1)
    if not torch.equal(old.index_select(0, parents), new):  # rule out hash collisions
        return None
    return parents
