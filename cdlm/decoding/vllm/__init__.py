"""Contrastive decoding (CD) and contrastive input decoding (CID) on vLLM (optional: ``cdlm[vllm]``).

vLLM has no contrastive decoding. This package adds it as one vLLM v1 *batch-level* custom logits
processor, ``ContrastiveLogitsProcessor``, a small backend (``load_vllm`` + ``generate``) that
returns the same ``(list[Generation], GenerationStats)`` as ``cdlm.decoding.runner.generate``, and
``cdlm serve`` (vLLM's OpenAI-compatible server with the processor loaded)::

    from cdlm.decoding.vllm import load_vllm, generate
    engine = load_vllm("smollm2-135m-instruct", early_exit_layers=[8])   # serves cdlm's cached safetensors
    results, stats = generate(engine, prompts, "cd", amateur="early-exit:8", hyperparameters={"beta": 0.5})
    results, stats = generate(engine, prompts, "cid", contrastive_prompts=others)

Design
------
* **Expert in vLLM, contrast in the sampler.** vLLM computes the expert's logits for the whole
  continuous batch; the processor replaces the rows of contrastive requests with
  ``ContrastSettings.apply(expert_rows, amateur_rows)`` from ``cdlm.decoding.contrast``, the rule
  the transformers processors use, so both backends agree (alpha plausibility mask, O'Brien-Lewis or
  Li form, amateur temperature; CID = Li form with weight lambda).
* **Early exit inside the engine** (``early_exit``): a model class registered through vLLM's
  out-of-tree model mechanism (a ``vllm.general_plugins`` entry point) returns layer N's hidden state
  with the final one (vLLM's EAGLE-3 auxiliary hidden states) and turns it into logits with the
  model's own norm and head; an ``early-exit:N`` amateur then costs one norm + head per step.
* **Other amateurs are batched** (``state.BatchedAmateur``): a separate model, an early exit that
  the engine does not capture, or the expert itself on CID's contrastive input run as one
  transformers forward per engine step for every request using them, over a padded shared KV cache
  with per-row positions and masks; rows join, leave, stall and are preempted with vLLM's
  ``BatchUpdate``, and their memory is freed when they leave (design reasoned in ``state``).
* **Per-request settings through ``SamplingParams.extra_args``** as flat ``cdlm_*`` keys
  (``ContrastParams``; over HTTP the body's ``vllm_xargs``), so greedy, sampled, CD and CID requests
  with different hyperparameters share one engine and batch. ``validate_params`` rejects bad
  settings when a request is submitted (HTTP 400 on the server), checked against the served model
  (``served``: layers, vocabulary, ``max_model_len``, amateurs that resolve and share the tokenizer).
* **No request can stop the engine.** Whatever still fails inside the engine for one request (an
  amateur that cannot be built, a failing forward) ends that request at once (EOS) and is logged;
  the other requests and later clients are unaffected (``core``).
* The processor is not argmax-invariant, so vLLM applies it for greedy requests too; sampling
  parameters (temperature, top-k, top-p) then act on the contrastive scores, as in transformers.

Limits
------
* Batched amateurs run in transformers inside vLLM's sampling step, on the processor's device: not
  paged or compiled, and outside vLLM's memory accounting (on GPU, leave room with
  ``gpu_memory_utilization``). Amateurs whose cache has sliding-window layers run one row per group.
* Engine early exit covers the architectures in ``early_exit.BASES`` (Llama/Mistral, Qwen2/3) and
  the layers chosen at start; no pipeline parallelism. With tensor parallelism the processor (and a
  separate amateur) runs in every worker, so amateurs must be spec strings.
* No beam search (vLLM's beam search does not run custom processors per beam); no speculative
  decoding (vLLM rejects custom logits processors with it); prompts must be token ids or text (no
  prompt embeddings); async scheduling must stay off (``load_vllm`` and ``cdlm serve`` turn it off).
* ``register_amateur`` (in-memory models) needs vLLM's engine in this process, which ``load_vllm``
  arranges (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); in a multi-process server use spec strings.
* Numerics: vLLM's expert logits come from vLLM's kernels, not transformers', so they differ by
  float rounding (~1e-5 in float32); greedy tokens agree unless two contrastive scores are that close
  (see ``tests/test_vllm_backend.py`` and ``benchmarks/results/vllm.md``).

Importing ``cdlm`` or this package does not import vLLM; ``ContrastiveLogitsProcessor`` and
``load_vllm`` import it on first use and raise an ``ImportError`` saying how to install it.
"""

from __future__ import annotations

from typing import Any

from cdlm.decoding.vllm.amateurs import clear_amateurs, register_amateur
from cdlm.decoding.vllm.backend import (
    VLLMEngine,
    completion_generator,
    generate,
    load_vllm,
    require_vllm,
    runner_compatible,
)
from cdlm.decoding.vllm.params import KEY_PREFIX, ContrastParams
from cdlm.decoding.vllm.served import resolve_served_folder

PROCESSOR_FQCN = "cdlm.decoding.vllm.processors:ContrastiveLogitsProcessor"

__all__ = [
    "KEY_PREFIX",
    "PROCESSOR_FQCN",
    "ContrastParams",
    "ContrastiveLogitsProcessor",
    "VLLMEngine",
    "clear_amateurs",
    "completion_generator",
    "generate",
    "load_vllm",
    "register_amateur",
    "require_vllm",
    "resolve_served_folder",
    "runner_compatible",
]


def __getattr__(name: str) -> Any:
    if name == "ContrastiveLogitsProcessor":
        require_vllm()
        from cdlm.decoding.vllm.processors import ContrastiveLogitsProcessor

        return ContrastiveLogitsProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
