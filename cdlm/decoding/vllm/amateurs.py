"""Resolve a request's amateur spec to a transformers model, loading each one once per process.

Spec forms (``ContrastParams.amateur``):

* a name given to ``register_amateur`` (an already-loaded model, e.g. the one a ``DecodingMethod``
  holds; only visible when vLLM runs its engine in this process, which ``load_vllm`` arranges);
* ``"self"``: the expert itself, loaded by transformers from the folder vLLM serves (CID);
* ``"early-exit:N"``: the expert's first N layers + its final norm and lm_head
  (``cdlm.models.amateur.EarlyExitAmateur``), built from that same transformers copy;
* anything else: a ``cdlm.models.load_model`` reference (registered name, GGUF, folder, hub id),
  checked for a vocabulary identical to the expert's.

No vLLM import: this module is used by the processor inside vLLM's engine and tested on its own.
"""

from __future__ import annotations

import threading

import torch

from cdlm.decoding.vllm.params import SELF_AMATEUR
from cdlm.decoding.vllm.state import HFAmateur

_REGISTERED: dict[str, torch.nn.Module] = {}
_LOADED: dict[tuple, HFAmateur] = {}
_EXPERTS: dict[tuple, tuple] = {}
_LOCK = threading.Lock()


def register_amateur(name: str, model: torch.nn.Module) -> str:
    """Make an in-memory transformers model available to requests as ``amateur=name``."""
    if not name:
        raise ValueError("register_amateur needs a non-empty name")
    _REGISTERED[name] = model
    for key in [k for k in _LOADED if k[0] == name]:
        del _LOADED[key]
    return name


def clear_amateurs() -> None:
    """Forget every registered and loaded amateur (frees their memory and KV caches' models)."""
    _REGISTERED.clear()
    _LOADED.clear()
    _EXPERTS.clear()


def _expert_copy(source: str, device: torch.device, dtype: torch.dtype):
    """The expert as a transformers model (and its tokenizer), loaded from the folder vLLM serves."""
    key = (source, str(device), dtype)
    if key not in _EXPERTS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
        _EXPERTS[key] = (model, AutoTokenizer.from_pretrained(source))
    return _EXPERTS[key]


def get_amateur(spec: str, expert_source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> HFAmateur:
    """The ``HFAmateur`` for ``spec`` next to the expert served from ``expert_source`` (cached)."""
    device = torch.device(device)
    key = (spec, expert_source, str(device), dtype)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        if spec in _REGISTERED:
            amateur = HFAmateur(_REGISTERED[spec], name=spec)
        elif spec == SELF_AMATEUR:
            amateur = HFAmateur(_expert_copy(expert_source, device, dtype)[0], name=f"{expert_source} (self)")
        elif spec.startswith("early-exit:"):
            from cdlm.models.amateur import EarlyExitAmateur

            layers = spec[len("early-exit:") :]
            if not layers.isdigit():
                raise ValueError(f"early-exit amateur spec must be 'early-exit:N' with an integer N, got {spec!r}")
            expert, _ = _expert_copy(expert_source, device, dtype)
            amateur = HFAmateur(EarlyExitAmateur(expert, int(layers)).model, name=spec)
        else:
            from cdlm.models import load_model
            from cdlm.models.amateur import check_same_vocabulary

            loaded = load_model(spec, device=device, dtype=dtype)
            _, expert_tokenizer = _expert_copy(expert_source, device, dtype)
            check_same_vocabulary(expert_tokenizer, loaded.tokenizer, expert_name=expert_source, amateur_name=spec)
            amateur = HFAmateur(loaded.model, name=spec)
        _LOADED[key] = amateur
        return amateur
