"""Resolve a request's amateur spec to the object that scores it, loading each model once per process.

Spec forms (``ContrastParams.amateur``):

* ``"early-exit:N"``: the expert's first N layers + its final norm and LM head. When the engine
  serves the expert through cdlm's early-exit model class with layer N captured
  (``cdlm.decoding.vllm.early_exit``), the amateur's logits come from vLLM's own forward pass
  (``EngineEarlyExit``: one norm + head, no second model); otherwise they are recomputed by
  ``cdlm.models.amateur.EarlyExitAmateur`` on a transformers copy, batched (``BatchedAmateur``).
* ``"self"``: the expert itself, loaded by transformers from the folder vLLM serves (CID).
* a name given to ``register_amateur`` (an already-loaded model, e.g. the one a ``DecodingMethod``
  holds; only visible when vLLM runs its engine in this process, which ``load_vllm`` arranges);
* anything else: a ``cdlm.models.load_model`` reference (registered name, GGUF, folder, hub id),
  checked for a vocabulary identical to the expert's.

No vLLM import: this module is used by the processor inside vLLM's engine and tested on its own.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from cdlm.decoding.vllm.params import SELF_AMATEUR
from cdlm.decoding.vllm.state import BatchedAmateur

_REGISTERED: dict[str, torch.nn.Module] = {}
_LOADED: dict[tuple, BatchedAmateur] = {}
_EXPERTS: dict[tuple, tuple] = {}
_LOCK = threading.RLock()


def register_amateur(name: str, model: torch.nn.Module) -> str:
    """Make an in-memory transformers model available to requests as ``amateur=name``."""
    if not name:
        raise ValueError("register_amateur needs a non-empty name")
    with _LOCK:
        _REGISTERED[name] = model
        for key in [k for k in _LOADED if k[0] == name]:
            del _LOADED[key]
    return name


def is_registered(name: str) -> bool:
    """Whether ``name`` was given to ``register_amateur`` in this process."""
    with _LOCK:
        return name in _REGISTERED


def clear_amateurs() -> None:
    """Forget every registered and loaded amateur (frees their models and KV caches)."""
    with _LOCK:
        _REGISTERED.clear()
        _LOADED.clear()
        _EXPERTS.clear()


def _expert_copy(source: str, device: torch.device, dtype: torch.dtype):
    """The expert as a transformers model (and its tokenizer), loaded from the folder vLLM serves."""
    key = (source, str(device), dtype)
    if key not in _EXPERTS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model = model.to(device).eval()
        _EXPERTS[key] = (model, AutoTokenizer.from_pretrained(source))
    return _EXPERTS[key]


def get_amateur(
    spec: str, expert_source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> BatchedAmateur:
    """The ``BatchedAmateur`` for ``spec`` next to the expert served from ``expert_source`` (cached).

    One object per (spec, expert, device, dtype), so every request with the same amateur shares one
    batch and one forward per step.
    """
    from cdlm.models.amateur import parse_early_exit

    device = torch.device(device)
    key = (spec, expert_source, str(device), dtype)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        layers = parse_early_exit(spec)
        if spec in _REGISTERED:
            amateur = BatchedAmateur(_REGISTERED[spec], name=spec)
        elif spec == SELF_AMATEUR:
            amateur = BatchedAmateur(_expert_copy(expert_source, device, dtype)[0], name=f"{expert_source} (self)")
        elif layers is not None:
            from cdlm.models.amateur import EarlyExitAmateur

            expert, _ = _expert_copy(expert_source, device, dtype)
            amateur = BatchedAmateur(EarlyExitAmateur(expert, layers).model, name=spec)
        else:
            from cdlm.models import load_model
            from cdlm.models.amateur import check_same_vocabulary

            loaded = load_model(spec, device=device, dtype=dtype)
            _, expert_tokenizer = _expert_copy(expert_source, device, dtype)
            check_same_vocabulary(expert_tokenizer, loaded.tokenizer, expert_name=expert_source, amateur_name=spec)
            amateur = BatchedAmateur(loaded.model, name=spec)
        _LOADED[key] = amateur
        return amateur
