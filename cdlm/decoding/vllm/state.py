"""Per-request amateur state kept beside vLLM's persistent batch (no vLLM import here).

vLLM runs the expert; the amateur (a small model, the expert's early exit, or the expert itself on
CID's contrastive input) is an ordinary transformers model that vLLM knows nothing about. Each
contrastive request therefore carries its own amateur KV cache (a ``DynamicCache``), fed
incrementally: at every step the processor feeds the amateur the tokens it has not seen yet
(``prefix + output_ids`` past ``fed``) and reads its last-position logits.

Feeding "whatever is new" rather than "the last token" makes the state robust to the ways vLLM
drives logits processors: a step that produced no new token (a chunked-prefill step) feeds nothing
and reuses the previous logits, a request re-added after preemption carries all its output so far,
and a shrunk context (never expected) rebuilds the cache from scratch.

``RequestTable`` applies vLLM's ``BatchUpdate`` bookkeeping (removed, then added, then moved, as the
vLLM interface documents) to a ``{batch_index: RequestState}`` dict.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from cdlm.decoding.vllm.params import ContrastParams


class Amateur(Protocol):
    """Anything that turns a request's unseen tokens into the amateur's next-token logits."""

    def advance(self, state: "RequestState") -> torch.Tensor:  # pragma: no cover - protocol
        ...


@dataclass
class RequestState:
    """One contrastive request: its settings, the amateur's input and the amateur's KV cache.

    ``output_ids`` is vLLM's own running list of generated ids for the request (a live reference,
    appended to by vLLM after every step), so the state never copies tokens.
    """

    params: ContrastParams
    prefix: list[int]
    output_ids: list[int]
    amateur: Amateur
    cache: Any = None
    fed: int = 0
    last_logits: torch.Tensor | None = None
    steps: int = field(default=0)

    def context_length(self) -> int:
        return len(self.prefix) + len(self.output_ids)

    def pending_ids(self) -> list[int]:
        """Ids the amateur has not consumed yet; resets the cache if the context shrank."""
        if self.fed > self.context_length():
            self.reset()
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

    def reset(self) -> None:
        self.cache = None
        self.fed = 0
        self.last_logits = None

    def amateur_logits(self) -> torch.Tensor:
        """The amateur's next-token logits (V,) for the request's current context."""
        logits = self.amateur.advance(self)
        self.steps += 1
        return logits


class HFAmateur:
    """A transformers causal LM used as an amateur, one ``DynamicCache`` per request.

    Requests are run one at a time (batch 1): their contexts have different lengths and arrive and
    leave at different steps, and batch-1 forwards need no padding, so each request's amateur logits
    are exactly what an unbatched ``generate()`` would compute.
    """

    def __init__(self, model: torch.nn.Module, name: str = "amateur"):
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        # Only the last position's logits are needed (as in cdlm.decoding._amateur_state): skips the
        # lm_head on every prompt position at prefill.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def advance(self, state: RequestState) -> torch.Tensor:
        pending = state.pending_ids()
        if not pending:
            if state.last_logits is None:
                raise RuntimeError("amateur has no context to score: the request has an empty prompt")
            return state.last_logits
        from transformers import DynamicCache

        if state.cache is None:
            state.cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([pending], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            output = self.model(input_ids=input_ids, past_key_values=state.cache, use_cache=True, **self._keep)
        state.cache = output.past_key_values
        state.fed += len(pending)
        state.last_logits = output.logits[0, -1].float()
        return state.last_logits


StateFactory = Callable[[Any, "Sequence[int] | None", list[int]], "RequestState | None"]


class RequestTable:
    """``{persistent-batch index: RequestState}``, kept in step with vLLM's batch updates."""

    def __init__(self) -> None:
        self.states: dict[int, RequestState] = {}

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, index: int) -> bool:
        return index in self.states

    def __getitem__(self, index: int) -> RequestState:
        return self.states[index]

    def items(self):
        return self.states.items()

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
        ``(a, b, "swap")`` (exchange) or ``(a, b, <anything else>)`` (a -> b, a is left empty).
        """
        for index in removed:
            self.states.pop(index, None)
        for index, params, prompt_ids, output_ids in added:
            state = make_state(params, prompt_ids, output_ids)
            if state is None:
                self.states.pop(index, None)
            else:
                self.states[index] = state
        for a_index, b_index, direction in moved:
            a_state = self.states.pop(a_index, None)
            b_state = self.states.pop(b_index, None)
            if a_state is not None:
                self.states[b_index] = a_state
            if b_state is not None and _is_swap(direction):
                self.states[a_index] = b_state


def _is_swap(direction: Any) -> bool:
    return getattr(direction, "name", direction) in ("SWAP", "swap")
