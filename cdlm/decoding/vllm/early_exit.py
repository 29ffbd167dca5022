"""Early-exit amateurs read off vLLM's own forward pass: one norm + LM head, no second model.

vLLM gives logits processors the final logits only. It does, however, let a model return hidden
states of chosen layers with its output: the "auxiliary hidden states" EAGLE-3 speculative decoding
uses (``SupportsEagle3.set_aux_hidden_state_layers``; Llama, Qwen2/3, Mistral-style models and
others implement it). cdlm registers, through vLLM's documented out-of-tree model mechanism
(``ModelRegistry.register_model``, run by the ``vllm.general_plugins`` entry point
``cdlm.decoding.vllm.early_exit:register`` in every vLLM process), one subclass per supported
architecture, named ``Cdlm<Architecture>``, which

1. asks the base model for the hidden state after each captured layer N (``hidden + residual`` after
   N decoder layers: exactly transformers' ``hidden_states[N]``, the input of cdlm's
   ``EarlyExitAmateur`` head);
2. returns ``[final hidden | layer-N hidden ...]`` concatenated on the feature axis from ``forward``,
   so vLLM's runner selects the sampled positions of all of them with its usual ``hidden[logits_indices]``;
3. in ``compute_logits`` splits them again, computes the expert's logits as usual, and the amateur's
   as ``lm_head(final_norm(h_N))`` with the model's own norm, head, soft-capping and scale, then
   publishes those ``(rows, vocab)`` logits for the current step under the engine's instance id;
4. ``ContrastiveLogitsProcessor`` (same process, same step, rows in the same persistent-batch order)
   reads them back (``EngineEarlyExit``).

Switch it on per engine with ``hf_overrides={"architectures": ["CdlmLlamaForCausalLM"],
"cdlm_early_exit_layers": [8]}`` (``load_vllm(..., early_exit_layers=[8])`` and ``cdlm serve
--early-exit-layers 8`` do this). Requests whose ``early-exit:N`` is not captured fall back to the
batched transformers copy. The captured set is fixed when the engine starts because the model's
outputs are.

Limits: pipeline parallelism is not supported (the concatenated tensor would cross stages);
speculative decoding is refused by vLLM for custom logits processors anyway. Importing this module
does not import vLLM; ``register()`` and the model classes do.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import torch

CONFIG_KEY = "cdlm_early_exit_layers"
CLASS_PREFIX = "Cdlm"
# Architectures whose vLLM class implements SupportsEagle3 (aux hidden states) and has the usual
# ``model.norm`` / ``lm_head`` / ``logits_processor`` layout; module paths are vLLM's.
BASES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM",
}

_PUBLISHED: dict[str, dict[int, torch.Tensor]] = {}
_PUBLISH_LOCK = threading.Lock()


def early_exit_architecture(architecture: str) -> str:
    """The cdlm architecture name serving ``architecture`` with early-exit capture; ValueError if unsupported."""
    if architecture not in BASES:
        raise ValueError(
            f"early exit inside the vLLM engine supports {sorted(BASES)}, not {architecture!r}; "
            "use an early-exit amateur without engine capture (a separate batched forward)"
        )
    return CLASS_PREFIX + architecture


def engine_overrides(architecture: str, layers: Iterable[int]) -> dict[str, Any]:
    """``hf_overrides`` that make vLLM serve ``architecture`` with layers ``layers`` captured."""
    layers = sorted({int(n) for n in layers})
    if not layers or layers[0] < 1:
        raise ValueError(f"early-exit layers must be integers >= 1, got {layers}")
    return {"architectures": [early_exit_architecture(architecture)], CONFIG_KEY: layers}


def captured_layers(hf_config: Any) -> tuple[int, ...]:
    """The early-exit layers an engine's (overridden) model config captures; () when none."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not any(str(a).startswith(CLASS_PREFIX) for a in architectures):
        return ()
    return tuple(sorted({int(n) for n in (getattr(hf_config, CONFIG_KEY, None) or ())}))


def publish(key: str, logits_by_layer: dict[int, torch.Tensor]) -> None:
    with _PUBLISH_LOCK:
        _PUBLISHED[key] = logits_by_layer


def published(key: str, layer: int) -> torch.Tensor:
    with _PUBLISH_LOCK:
        by_layer = _PUBLISHED.get(key)
    if by_layer is None or layer not in by_layer:
        raise RuntimeError(
            f"no early-exit logits for layer {layer} were published by the engine's model this step: "
            "is the engine serving a cdlm early-exit architecture in this process (async scheduling off)?"
        )
    return by_layer[layer]


def forget(key: str) -> None:
    with _PUBLISH_LOCK:
        _PUBLISHED.pop(key, None)


class EngineEarlyExit:
    """The processor side: early-exit logits of the rows being sampled, read from the engine's step."""

    def __init__(self, key: str, layer: int):
        self.key, self.layer, self.name = key, layer, f"early-exit:{layer} (engine)"

    def rows_logits(self, indices: list[int], batch_rows: int) -> torch.Tensor:
        logits = published(self.key, self.layer)
        if logits.shape[0] != batch_rows:
            raise RuntimeError(
                f"the engine published early-exit logits for {logits.shape[0]} rows but the sampler has "
                f"{batch_rows}: the step's rows do not line up (speculative decoding or async scheduling?)"
            )
        return logits[indices]


def _build_class(architecture: str) -> type:
    import importlib

    module_name, class_name = BASES[architecture].split(":")
    base = getattr(importlib.import_module(module_name), class_name)

    class EarlyExitCapture(base):  # type: ignore[misc, valid-type]
        """``base`` plus layer-N hidden states turned into early-exit logits (see module docstring)."""

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            config = vllm_config.model_config.hf_config
            layers = tuple(sorted({int(n) for n in (getattr(config, CONFIG_KEY, None) or ())}))
            total = config.num_hidden_layers
            if not layers or layers[0] < 1 or layers[-1] >= total:
                raise ValueError(f"{CONFIG_KEY} must list layers in [1, {total - 1}], got {list(layers)}")
            if vllm_config.parallel_config.pipeline_parallel_size > 1:
                raise ValueError("cdlm early-exit capture does not support pipeline parallelism")
            self.cdlm_layers = layers
            self.cdlm_key = vllm_config.instance_id
            self.set_aux_hidden_state_layers(layers)

        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            if isinstance(output, tuple):
                hidden, aux = output
                return torch.cat([hidden, *aux], dim=-1)
            return output

        def compute_logits(self, hidden_states: torch.Tensor):
            size = self.config.hidden_size
            if hidden_states.shape[-1] == size:  # nothing captured (never expected)
                return super().compute_logits(hidden_states)
            logits = super().compute_logits(hidden_states[..., :size])
            early = {}
            for slot, layer in enumerate(self.cdlm_layers, start=1):
                hidden = hidden_states[..., slot * size : (slot + 1) * size]
                early[layer] = super().compute_logits(self.model.norm(hidden.contiguous()))
            publish(self.cdlm_key, early)
            return logits

    EarlyExitCapture.__name__ = EarlyExitCapture.__qualname__ = CLASS_PREFIX + architecture
    return EarlyExitCapture


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``Cdlm<Architecture>`` classes, built on first use (vLLM imports them by this module path)."""
    if name.startswith(CLASS_PREFIX) and name[len(CLASS_PREFIX) :] in BASES:
        architecture = name[len(CLASS_PREFIX) :]
        if architecture not in _CLASSES:
            _CLASSES[architecture] = _build_class(architecture)
        return _CLASSES[architecture]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the ``Cdlm<Architecture>`` model classes with vLLM (lazily: nothing is imported until used).

    The ``vllm.general_plugins`` entry point of cdlm's package runs this in every vLLM process;
    calling it again is harmless.
    """
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture in BASES:
        name = CLASS_PREFIX + architecture
        if name not in supported:
            ModelRegistry.register_model(name, f"{__name__}:{name}")
