"""The contrastive processor's logic, independent of vLLM's classes (so it is testable without vLLM).

``ContrastiveProcessorCore`` is what ``ContrastiveLogitsProcessor`` delegates to: it turns vLLM's
batch updates into per-request ``RequestState``s (joining and leaving their amateur's batch) and
rewrites the logits rows of contrastive requests. Per step it runs one batched forward per amateur
model (``BatchedAmateur``), reads engine-captured early exits (``EngineEarlyExit``), then applies
each row's contrast rule (``cdlm.decoding.contrast``; rows with the same settings in one call). A
fake engine loop drives it exactly as vLLM's sampler does (``tests/test_vllm_state.py``).

An exception leaving ``update``/``apply`` would end vLLM's engine for every client, and vLLM gives a
logits processor no way to fail one request. So requests are checked at admission (``validate``,
against the served model: ``served``), and whatever still fails for a request in here (its amateur
cannot be built, its amateur's forward or its rule raises) is logged and *ends that request*: its
row gets only EOS from then on, so vLLM finishes it at once; other rows are untouched.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import torch

from cdlm.decoding.vllm.amateurs import get_amateur
from cdlm.decoding.vllm.early_exit import EngineEarlyExit
from cdlm.decoding.vllm.params import ContrastParams
from cdlm.decoding.vllm.served import ServedModel, check_request
from cdlm.decoding.vllm.state import BatchedAmateur, RequestState, RequestTable

logger = logging.getLogger(__name__)

AmateurResolver = Callable[[str, str, torch.device, torch.dtype], BatchedAmateur]


class ContrastiveProcessorCore:
    """Per-request amateur state plus the row rewrite, for one engine.

    Args:
        expert_source: the folder (or hub id) the engine serves; ``"self"`` and ``"early-exit:N"``
            amateurs are transformers copies loaded from it.
        device: where amateurs run and their logits go.
        dtype: amateur dtype (the engine's).
        resolve_amateur: spec -> ``BatchedAmateur`` (defaults to ``cdlm.decoding.vllm.amateurs.get_amateur``).
        engine_early_exit: ``(engine key, captured layers)`` when the engine's model publishes
            early-exit logits (``cdlm.decoding.vllm.early_exit``); those specs skip the second model.
        eos_ids: the served model's EOS ids (default: read from ``expert_source`` on first use).
    """

    def __init__(
        self,
        expert_source: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolve_amateur: AmateurResolver = get_amateur,
        engine_early_exit: tuple[str, Sequence[int]] | None = None,
        eos_ids: Sequence[int] | None = None,
    ) -> None:
        self.expert_source = expert_source
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolve_amateur = resolve_amateur
        self.engine_key, layers = engine_early_exit or ("", ())
        self.engine_layers = {layer: EngineEarlyExit(self.engine_key, layer) for layer in layers}
        self.table = RequestTable(on_remove=self._leave)
        self._eos_ids: tuple[int, ...] | None = None if eos_ids is None else tuple(eos_ids)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The served model's EOS ids (what ``eos_promotion="forbid"`` protects), read once from its folder."""
        if self._eos_ids is None:
            from transformers import AutoTokenizer, GenerationConfig

            from cdlm.models.prompts import eos_token_ids

            try:  # the same ids as the transformers methods: generation config + tokenizer
                config = GenerationConfig.from_pretrained(self.expert_source)
            except OSError:
                config = None
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.expert_source)
            except (OSError, ValueError):
                tokenizer = None
            self._eos_ids = tuple(eos_token_ids(config, tokenizer))
        return self._eos_ids

    @staticmethod
    def validate(extra_args: dict | None, max_tokens: int | None = None) -> ContrastParams | None:
        """The request's settings, checked completely (against the served model when it is known)."""
        params = ContrastParams.from_extra_args(extra_args)
        if params is not None:
            check_request(params, ServedModel.from_env(), max_tokens)
        return params

    def new_state(self, params: Any, prompt_ids: Sequence[int] | None, output_ids: list[int]) -> RequestState | None:
        """The request's state (``None``: not contrastive); a request that cannot be served gets a failed state."""
        try:
            return self._new_state(params, prompt_ids, output_ids)
        except Exception as error:  # noqa: BLE001 - this request's failure, never the engine's
            state = RequestState(None, list(prompt_ids or ()), output_ids)
            self._fail(state, error)
            return state

    def _new_state(self, params: Any, prompt_ids: Sequence[int] | None, output_ids: list[int]) -> RequestState | None:
        settings = ContrastParams.from_extra_args(getattr(params, "extra_args", None))
        if settings is None:
            return None
        if settings.method == "cid":
            prefix = list(settings.contrastive_prompt_token_ids or ())
        else:
            if prompt_ids is None:
                raise ValueError(
                    "contrastive decoding needs the prompt's token ids (prompt embeddings are not supported)"
                )
            prefix = list(prompt_ids)
        state = RequestState(settings, prefix, output_ids)
        if settings.settings.is_identity_contrast:
            return state  # weight 0: the amateur's scores would be multiplied by 0, so none is run
        from cdlm.models.amateur import parse_early_exit

        spec = settings.amateur or ""
        layer = parse_early_exit(spec)
        if layer in self.engine_layers:
            state.amateur = self.engine_layers[layer]
        else:
            self.resolve_amateur(spec, self.expert_source, self.device, self.dtype).join(state)
        return state

    def _fail(self, state: RequestState, error: BaseException) -> None:
        """Mark ``state`` failed (its row is ended with EOS from now on) and free its amateur row."""
        if state.failure is None:
            state.failure = f"{type(error).__name__}: {error}"
            logger.error(
                "cdlm: a contrastive request failed inside the engine and is ended (the engine keeps serving): %s",
                state.failure,
                exc_info=error,
            )
        self._leave(state)
        state.amateur = None

    @staticmethod
    def _leave(state: RequestState) -> None:
        if isinstance(state.amateur, BatchedAmateur):
            try:
                state.amateur.leave(state)
            except Exception:  # noqa: BLE001 - freeing a row must not stop the engine
                logger.exception("cdlm: freeing a request's amateur row failed")

    def update(
        self,
        removed: Iterable[int],
        added: Iterable[tuple[int, Any, Sequence[int] | None, list[int]]],
        moved: Iterable[tuple[int, int, Any]],
    ) -> None:
        try:
            self.table.update(removed, added, moved, self.new_state)
        except Exception as error:  # noqa: BLE001 - never expected (states are built guarded): end every row
            for _, state in self.table.items():
                self._fail(state, error)

    def amateur_logits(self, rows: int) -> dict[int, torch.Tensor]:
        """``{batch index: amateur logits (V,)}`` for every contrastive row that needs them.

        An amateur whose forward fails fails every request it scores (its cache may be half-updated).
        """
        by_amateur: dict[int, tuple[Any, list[int], list[RequestState]]] = {}
        for index, state in self.table.items():
            if state.amateur is not None and state.failure is None:
                by_amateur.setdefault(id(state.amateur), (state.amateur, [], []))
                by_amateur[id(state.amateur)][1].append(index)
                by_amateur[id(state.amateur)][2].append(state)
        result: dict[int, torch.Tensor] = {}
        for amateur, indices, states in by_amateur.values():
            try:
                if isinstance(amateur, EngineEarlyExit):
                    logits = amateur.rows_logits(indices, rows)
                else:
                    logits = amateur.logits(states)  # one batched forward for every request of this amateur
            except Exception as error:  # noqa: BLE001 - these requests' failure, never the engine's
                for state in states:
                    self._fail(state, error)
                continue
            result.update(zip(indices, logits))
        return result

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Rewrite, in place, the rows of contrastive requests; other rows are left untouched.

        Rows that share a contrast rule are contrasted in one call of the rule the transformers
        processors use (``ContrastSettings.apply``), so both backends agree. Failed requests' rows
        get only EOS (see the module docstring).
        """
        if not len(self.table):
            return logits
        try:
            self._contrast(logits)
        except Exception as error:  # noqa: BLE001 - never expected: end every contrastive row, keep serving
            for _, state in self.table.items():
                self._fail(state, error)
        failed = [index for index, state in self.table.items() if state.failure is not None]
        if failed:
            self._end_rows(logits, failed)
        return logits

    def _contrast(self, logits: torch.Tensor) -> None:
        others = self.amateur_logits(logits.shape[0])
        by_rule: dict[Any, list[int]] = {}
        for index, state in self.table.items():
            if state.failure is None and state.params is not None:
                by_rule.setdefault(state.params.rule(self.eos_ids), []).append(index)
        for rule, indices in by_rule.items():
            try:
                rows = torch.tensor(indices, device=logits.device)
                expert = logits.index_select(0, rows)
                if rule.is_identity_contrast:
                    other = expert  # unused by the rule
                else:
                    other = torch.stack([others[i] for i in indices]).to(logits.device)
                logits[rows] = rule.apply(expert, other).to(logits.dtype)
            except Exception as error:  # noqa: BLE001 - these requests' failure, never the engine's
                for index in indices:
                    self._fail(self.table[index], error)

    def _end_rows(self, logits: torch.Tensor, indices: list[int]) -> None:
        """Only EOS stays possible in these rows, so vLLM finishes their requests at this step."""
        try:
            eos = [i for i in self.eos_ids if i < logits.shape[1]]
        except Exception:  # noqa: BLE001
            eos = []
        if not eos:
            logger.error("cdlm: cannot end %d failed request(s): the served model has no EOS id", len(indices))
            return
        rows = torch.tensor(indices, device=logits.device)
        logits[rows] = -math.inf
        logits[rows, eos[0]] = 0.0
