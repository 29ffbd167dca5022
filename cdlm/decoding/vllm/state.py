"""Per-request contrastive state beside vLLM's persistent batch, and the batched amateur (no vLLM import).

vLLM runs the expert; the amateur (a small model, the expert's early exit, or the expert itself on
CID's contrastive input) is a transformers model vLLM knows nothing about. Each contrastive request
is a ``RequestState`` (settings, the amateur's prefix, vLLM's live output list); every request that
shares an amateur model is a row of that model's ``BatchedAmateur``, which runs **one forward per
engine step for all of its rows**.

Why a padded batch over one shared ``DynamicCache`` (and not a paged cache)
-----------------------------------------------------------------------------
Rows join, leave, and differ in length; the forward must stay an ordinary transformers call so any
causal LM works as an amateur. So the cache is one ``(rows, heads, columns, head_dim)`` tensor per
layer where each row keeps its tokens in *some* columns and a per-row attention mask (``mask``) says
which. Columns are storage, not positions: every fed token carries its own position id (its index in
the row's context), so rotary embeddings are exact wherever the token's key sits, and the causal rule
by column still holds because a row's tokens are always written left to right.

* **Step**: each row's unseen tokens (normally one) are right-aligned in a ``(rows, k)`` chunk,
  left-filled with masked padding, and appended as new columns. A row with nothing new this step
  (a chunked-prefill step) gets one masked column; its logits are reused.
* **Join**: newcomers are prefilled together in one left-padded forward of their own (mixing a
  200-token prompt into the decode chunk would pad every decoding row to 200), then their cache
  rows are concatenated to the group's, left-padded to a common column count.
* **Leave** (finished, aborted, or preempted; vLLM re-adds a preempted request with its output so
  far, which is then just a newcomer): the row is dropped from every layer at once, so memory is
  freed when the request leaves, and columns no remaining row uses are cut.
* **Compaction** keeps memory bounded: when unused columns exceed a quarter of the cache, every
  row's used columns are gathered right-aligned (keys keep their rotary positions, so this is exact).
  Memory is O(rows x longest live context), the same as transformers' own batched ``generate()``.
* vLLM's ``moved`` updates only relabel batch indices (``RequestTable``); cache rows never move.

A paged cache would save the padding but needs a custom attention kernel; transformers' attention
with a 2-D mask is what its own left-padded ``generate()`` runs, so the amateur's logits equal an
unbatched run up to float rounding. Models whose cache layers are not plain full-attention layers
(sliding windows drop columns by count, which breaks the column bookkeeping) run with one row per
group instead: still correct, just not batched.

Feeding "whatever the row has not seen" rather than "the last token" keeps this robust to how vLLM
drives processors: no new token (chunked prefill) feeds nothing, a preempted request re-added with
its output feeds prompt + output, and a shrunk context (never expected) rebuilds the row.

``RequestTable`` applies vLLM's ``BatchUpdate`` (removed, then added, then moved, as the vLLM
interface documents) to a ``{batch_index: RequestState}`` dict.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from cdlm.decoding.vllm.params import ContrastParams


@dataclass(eq=False)
class RequestState:
    """One contrastive request: its settings, the amateur's input, and where its amateur state lives.

    ``output_ids`` is vLLM's own running list of generated ids for the request (a live reference,
    appended to by vLLM after every step), so the state never copies tokens. ``amateur`` is the
    ``BatchedAmateur`` (or engine early exit) that scores it; ``row`` / ``fed`` / ``last_logits`` are
    that amateur's bookkeeping. ``failure`` says why the request could not be served (the processor
    then ends it); ``params`` is ``None`` only for such a request.
    """

    params: ContrastParams | None
    prefix: list[int]
    output_ids: list[int]
    amateur: Any = None
    row: int | None = None
    fed: int = 0
    next_position: int = 0
    last_logits: torch.Tensor | None = None
    steps: int = field(default=0)
    failure: str | None = None

    def context_length(self) -> int:
        return len(self.prefix) + len(self.output_ids)

    def pending_ids(self) -> list[int]:
        """Ids the amateur has not consumed yet (``fed`` counts those it has)."""
        start = self.fed
        if start < len(self.prefix):
            pending = list(self.prefix[start:]) + list(self.output_ids)
        else:
            pending = list(self.output_ids[start - len(self.prefix) :])
        if any(token < 0 for token in pending):
            raise RuntimeError(
                "cdlm's vLLM contrastive processor saw a placeholder token id (< 0): it needs the "
                "real sampled ids each step; disable async scheduling (LLM(..., async_scheduling=False))"
            )
        return pending


def _plain_full_attention(model: Any) -> bool:
    """True when every layer of the model's ``DynamicCache`` is a plain (full-attention) ``DynamicLayer``."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - an unusual config: take the safe path
        return False
    layers = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class _Group:
    """The rows sharing one padded cache (see the module docstring)."""

    def __init__(self) -> None:
        self.states: list[RequestState] = []  # cache row order
        self.cache: Any = None  # a DynamicCache whose layers hold (rows, heads, columns, head_dim)
        self.mask: Any = None  # (rows, columns) long tensor, 1 = a real token

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def layers(self):
        return self.cache.layers

    def select(self, keep: list[int]) -> None:
        """Keep only cache rows ``keep`` (in that order)."""
        self.states = [self.states[i] for i in keep]
        for row, state in enumerate(self.states):
            state.row = row
        if not self.states:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        for layer in self.layers():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.maybe_compact()

    def maybe_compact(self, force: bool = False) -> None:
        """Gather every row's used columns right-aligned when unused columns exceed a quarter of the cache."""
        if self.mask is None:
            return
        used = self.mask.sum(-1)
        width = int(used.max())
        unused = self.columns - width
        if unused == 0 or (not force and unused * 4 < self.columns and not bool((self.mask[:, 0] == 0).all())):
            return
        rows = self.mask.shape[0]
        # Stable sort puts masked columns first and used ones (in order) last: right-aligned, order kept.
        order = torch.sort(self.mask, dim=1, stable=True).indices[:, -width:]
        for layer in self.layers():
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            index = order[:, None, :, None].expand(rows, heads, width, dim).to(layer.keys.device)
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
        self.mask = (torch.arange(width, device=self.mask.device)[None] >= (width - used)[:, None]).long()

    def append(self, other: "_Group") -> None:
        """Concatenate ``other``'s rows after ours, left-padding the narrower side with masked columns."""
        if self.cache is None:
            self.states, self.cache, self.mask = other.states, other.cache, other.mask
        else:
            width = max(self.columns, other.columns)
            for mine, theirs in zip(self.layers(), other.layers()):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], 0)
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], 0)
            self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(other.mask, width)], 0)
            self.states = self.states + other.states
        for row, state in enumerate(self.states):
            state.row = row


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
    return torch.cat([pad, tensor], 2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], 1)


class BatchedAmateur:
    """A transformers causal LM scoring many requests at once, one forward per step (see module docstring).

    ``join(state)`` / ``leave(state)`` follow the batch; ``logits(states)`` returns the amateur's
    next-token logits ``(len(states), vocab)`` for each state's current context, running at most one
    prefill forward (newcomers) and one decode forward (everyone else) per group.
    """

    def __init__(self, model: torch.nn.Module, name: str = "amateur", *, batched: bool | None = None):
        self.model: Any = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        # Only the last position's logits are needed: skips the lm_head on every prompt position.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.batched = _plain_full_attention(model) if batched is None else batched
        self._shared = _Group()
        self._groups: dict[int, _Group] = {}  # id(state) -> group (one per state when not batched)
        self.forwards = 0  # model calls so far (tests and benchmarks read it)

    # ------------------------------------------------------------------ membership
    def join(self, state: RequestState) -> None:
        state.amateur, state.row, state.fed, state.next_position, state.last_logits = self, None, 0, 0, None
        self._groups[id(state)] = self._shared if self.batched else _Group()

    def leave(self, state: RequestState) -> None:
        group = self._groups.pop(id(state), None)
        if group is not None and state.row is not None and state in group.states:
            group.select([i for i, s in enumerate(group.states) if s is not state])
        state.row, state.last_logits = None, None

    @property
    def rows(self) -> int:
        """Cache rows held (requests with amateur state); 0 once every request has left."""
        groups = {id(g): g for g in self._groups.values()}
        return sum(len(g.states) for g in groups.values())

    def cache_columns(self) -> int:
        groups = {id(g): g for g in self._groups.values()}
        return max((g.columns for g in groups.values()), default=0)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def logits(self, states: Sequence[RequestState]) -> torch.Tensor:
        by_group: dict[int, tuple[_Group, list[RequestState]]] = {}
        for state in states:
            if id(state) not in self._groups:
                self.join(state)
            group = self._groups[id(state)]
            by_group.setdefault(id(group), (group, []))[1].append(state)
        for group, members in by_group.values():
            self._advance(group, members)
        rows = []
        for state in states:
            if state.last_logits is None:
                raise RuntimeError("amateur has no context to score: the request has an empty prompt")
            state.steps += 1
            rows.append(state.last_logits)
        return torch.stack(rows)

    def _advance(self, group: _Group, members: list[RequestState]) -> None:
        for state in group.states:  # a shrunk context (never expected): rebuild the row from scratch
            if state.fed > state.context_length():
                group.select([i for i, s in enumerate(group.states) if s is not state])
                state.row, state.fed, state.next_position, state.last_logits = None, 0, 0, None
        newcomers = [s for s in members if s.row is None]
        if any(s.pending_ids() for s in group.states):
            self._decode(group)
        newcomers = [s for s in newcomers if s.pending_ids()]
        if newcomers:
            group.append(self._prefill(newcomers))

    def _decode(self, group: _Group) -> None:
        """Append every cached row's unseen tokens (right-aligned in one chunk) and run one forward."""
        pending = [s.pending_ids() for s in group.states]
        width = max(1, max(len(p) for p in pending))
        rows = len(pending)
        ids = torch.zeros(rows, width, dtype=torch.long)
        chunk_mask = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for row, (state, tokens) in enumerate(zip(group.states, pending)):
            if tokens:
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                chunk_mask[row, width - len(tokens) :] = 1
                positions[row, width - len(tokens) :] = torch.arange(len(tokens)) + state.next_position
        mask = torch.cat([group.mask, chunk_mask.to(group.mask.device)], 1)
        logits = self._forward(ids, positions, mask, group.cache)
        group.mask = mask
        for row, (state, tokens) in enumerate(zip(group.states, pending)):
            if tokens:
                state.fed += len(tokens)
                state.next_position += len(tokens)
                state.last_logits = logits[row].float()
        group.maybe_compact()

    def _prefill(self, newcomers: list[RequestState]) -> _Group:
        """One left-padded forward over the newcomers' whole contexts; returns them as a group."""
        from transformers import DynamicCache

        pending = [s.pending_ids() for s in newcomers]
        width = max(len(p) for p in pending)
        ids = torch.zeros(len(pending), width, dtype=torch.long)
        mask = torch.zeros(len(pending), width, dtype=torch.long)
        for row, tokens in enumerate(pending):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        group = _Group()
        group.cache = DynamicCache(config=self.model.config)
        mask = mask.to(self.device)
        logits = self._forward(ids, positions, mask, group.cache)
        group.mask = mask
        group.states = list(newcomers)
        for row, (state, tokens) in enumerate(zip(newcomers, pending)):
            state.row = row
            state.fed = state.next_position = len(tokens)
            state.last_logits = logits[row].float()
        return group

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        self.forwards += 1
        output = self.model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            # An all-ones mask is dropped, as generate() does: attention then takes its fast causal path.
            attention_mask=None if bool(mask.all()) else mask,
            past_key_values=cache,
            use_cache=True,
            **self._keep,
        )
        return output.logits[:, -1, :]


StateFactory = Callable[[Any, "Sequence[int] | None", list[int]], "RequestState | None"]


class RequestTable:
    """``{persistent-batch index: RequestState}``, kept in step with vLLM's batch updates.

    ``on_remove(state)`` is called for every state that leaves the table (removed, or replaced by an
    added request at its index), so the amateur can free its cache row at once.
    """

    def __init__(self, on_remove: Callable[[Any], None] | None = None) -> None:
        self.states: dict[int, Any] = {}
        self.on_remove = on_remove or (lambda state: None)

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, index: int) -> bool:
        return index in self.states

    def __getitem__(self, index: int) -> Any:
        return self.states[index]

    def items(self):
        return self.states.items()

    def _drop(self, index: int) -> Any:
        state = self.states.pop(index, None)
        if state is not None:
            self.on_remove(state)
        return state

    def update(
        self,
        removed: Iterable[int],
        added: Iterable[tuple[int, Any, Sequence[int] | None, list[int]]],
        moved: Iterable[tuple[int, int, Any]],
        make_state: StateFactory,
    ) -> None:
        """Apply one ``BatchUpdate``: removals, then additions, then moves.

        ``make_state(params, prompt_ids, output_ids)`` returns a state, or ``None`` for a request the
        processor does not touch. An added request replaces whatever sat at its index. A move is
        ``(a, b, "swap")`` (exchange) or ``(a, b, <anything else>)`` (a -> b; whatever sat at b is
        gone, a is left empty).
        """
        for index in removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in added:
            self._drop(index)
            state = make_state(params, prompt_ids, output_ids)
            if state is not None:
                self.states[index] = state
        for a_index, b_index, direction in moved:
            a_state = self.states.pop(a_index, None)
            if _is_swap(direction):
                b_state = self.states.pop(b_index, None)
                if b_state is not None:
                    self.states[a_index] = b_state
            else:
                self._drop(b_index)
            if a_state is not None:
                self.states[b_index] = a_state


def _is_swap(direction: Any) -> bool:
    return getattr(direction, "name", direction) in ("SWAP", "swap")
