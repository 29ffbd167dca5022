"""The model a vLLM engine serves, and the checks of a request's cdlm settings against it.

vLLM calls ``validate_params`` (where a ``ValueError`` becomes HTTP 400) in its API process, which
holds none of the engine's objects; whatever fails later, inside the engine, would end the engine for
every client. So each request is checked here, at admission, against the served model: its layer
count (``early-exit:N``), its vocabulary (CID's ids), ``max_model_len`` (CID's input plus the
completion) and separate amateurs (they must resolve, be causal LMs and share the tokenizer).

The API process learns the served model from the environment variable ``SERVED_ENV`` (JSON), which
``cdlm serve`` sets before it execs vLLM's server and ``load_vllm`` sets before it builds its engine;
only the model's config and tokenizer are loaded, once per process. Without it (a plain ``vllm serve
--logits-processors ...``) only the checks that need no model run, and the engine-side guard
(``core``) ends a request that still fails. No vLLM import.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from cdlm.decoding.vllm.params import SELF_AMATEUR, ContrastParams

SERVED_ENV = "CDLM_VLLM_SERVED"
logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_FACTS: dict[str, "_Facts"] = {}
_AMATEURS_OK: set[tuple[str, str]] = set()  # (amateur spec, served source) pairs that passed
_warned = False


def resolve_served_folder(reference: str, gguf_file: str | None = None) -> str:
    """What vLLM should load for a cdlm reference: GGUF sources become their cached safetensors folder."""
    from cdlm.models.loading import cached_gguf_folder, resolve_reference

    kind, path, _ = resolve_reference(reference, gguf_file)
    if kind == "gguf":
        folder, _ = cached_gguf_folder(path)
        return str(folder)
    return str(path) if path is not None else reference


def served_architecture(folder: str) -> str:
    """The architecture named in the served folder's config.json (what vLLM would pick)."""
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(folder), "architectures", None) or []
    if len(architectures) != 1:
        raise ValueError(f"{folder}: config.json must name exactly one architecture, got {architectures}")
    return architectures[0]


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the folder vLLM serves, its context limit, captured early exits."""

    source: str
    max_model_len: int
    early_exit_layers: tuple[int, ...] = ()

    def to_env(self) -> str:
        layers = list(self.early_exit_layers)
        return json.dumps({"source": self.source, "max_model_len": self.max_model_len, "early_exit_layers": layers})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServedModel | None":
        text = environ.get(SERVED_ENV)
        if not text:
            return None
        try:
            data = json.loads(text)
            layers = tuple(int(n) for n in data["early_exit_layers"])
            return cls(str(data["source"]), int(data["max_model_len"]), layers)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{SERVED_ENV} is not a served-model description ({error!r}): {text[:200]!r}") from None


@dataclass(frozen=True)
class _Facts:
    num_layers: int
    vocab_size: int
    tokenizer: Any


def _facts(source: str) -> _Facts:
    """The served model's layer count, embedding rows and tokenizer (config + tokenizer only; cached)."""
    with _LOCK:
        if source not in _FACTS:
            from transformers import AutoConfig, AutoTokenizer

            try:
                config = AutoConfig.from_pretrained(source).get_text_config()
                tokenizer = AutoTokenizer.from_pretrained(source)
                facts = _Facts(int(config.num_hidden_layers), int(config.vocab_size), tokenizer)
            except Exception as error:  # noqa: BLE001 - reported on the request, never kills anything
                raise ValueError(f"cannot read the served model {source!r} to check cdlm settings: {error}") from None
            _FACTS[source] = facts
        return _FACTS[source]


def check_request(params: ContrastParams, served: ServedModel | None, max_tokens: int | None = None) -> None:
    """Raise ``ValueError`` naming the setting when ``params`` cannot run on ``served``.

    ``max_tokens`` is the request's completion limit: CID's amateur reads the contrastive input plus
    the completion, which must fit ``max_model_len`` as the prompt plus the completion must.
    """
    global _warned
    if served is None:
        if not _warned:
            _warned = True
            logger.warning(
                "cdlm: %s is not set (start the server with `cdlm serve`): requests are not checked against "
                "the served model; a request that fails inside the engine is ended there",
                SERVED_ENV,
            )
        return
    facts = _facts(served.source)
    if params.method == "cid":
        ids = params.contrastive_prompt_token_ids or ()
        outside = [i for i in ids if i >= facts.vocab_size]
        if outside:
            raise ValueError(
                f"cdlm_contrastive_prompt_token_ids: id {outside[0]} is outside the served model's vocabulary "
                f"(ids 0..{facts.vocab_size - 1})"
            )
        if len(ids) + (max_tokens or 0) > served.max_model_len:
            raise ValueError(
                f"cdlm_contrastive_prompt_token_ids has {len(ids)} ids; with max_tokens {max_tokens or 0} the "
                f"contrastive input and the completion exceed max_model_len {served.max_model_len}"
            )
    check_amateur(params.amateur or "", served)


def check_amateur(spec: str, served: ServedModel) -> None:
    """Raise ``ValueError`` unless the engine can build amateur ``spec`` next to the served model."""
    from cdlm.models.amateur import parse_early_exit

    if spec == SELF_AMATEUR:
        return
    layers = parse_early_exit(spec)
    if layers is not None:
        total = _facts(served.source).num_layers
        if layers not in served.early_exit_layers and not 1 <= layers < total:
            raise ValueError(
                f"cdlm_amateur {spec!r}: the served model has {total} decoder layers; "
                f"choose early-exit:1 .. early-exit:{total - 1}"
            )
        return
    from cdlm.decoding.vllm.amateurs import is_registered

    if is_registered(spec) or (spec, served.source) in _AMATEURS_OK:
        return
    try:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer

        from cdlm.models.amateur import check_same_vocabulary

        folder = resolve_served_folder(spec)
        config = AutoConfig.from_pretrained(folder)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(f"its config ({type(config).__name__}) is not a causal language model's")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        check_same_vocabulary(
            _facts(served.source).tokenizer, tokenizer, expert_name="the served model", amateur_name=spec
        )
    except Exception as error:  # noqa: BLE001 - any reason an amateur cannot be built is this request's error
        raise ValueError(f"cdlm_amateur {spec!r} cannot be used: {error}") from None
    with _LOCK:
        _AMATEURS_OK.add((spec, served.source))
