"""Contrastive decoding (CD) and contrastive input decoding (CID) on vLLM (optional: ``cdlm[vllm]``).

vLLM has no contrastive decoding. This package adds it as one vLLM v1 *batch-level* custom logits
processor, ``ContrastiveLogitsProcessor``, and a small backend (``load_vllm`` + ``generate``) that
returns the same ``(list[Generation], GenerationStats)`` as ``cdlm.decoding.runner.generate``::

    from cdlm.decoding.vllm import load_vllm, generate
    engine = load_vllm("smollm2-135m-instruct")                  # serves cdlm's cached safetensors
    results, stats = generate(engine, prompts, "cd", amateur="early-exit:8", hyperparameters={"beta": 0.5})
    results, stats = generate(engine, prompts, "cid", contrastive_prompts=others)

Design
------
* **Expert in vLLM, amateur beside it.** vLLM computes the expert's logits for the whole
  continuous batch. The processor then replaces the row of every contrastive request with
  ``cdlm.decoding._contrast.contrast(expert_row, amateur_row, ...)``, the very function the
  transformers processors use, so both backends apply the same rule (alpha plausibility mask,
  O'Brien-Lewis or Li form, amateur temperature; CID = Li form with weight lambda).
* **The amateur is a transformers model with per-request KV state.** Each contrastive request gets
  a ``RequestState`` holding its own ``DynamicCache``: for CD the amateur reads the request's prompt
  ids, for CID the expert itself (a transformers copy loaded from the served folder) reads the
  contrastive prompt's ids; both are then fed the tokens vLLM generates, read from the live
  ``output_tok_ids`` list vLLM gives processors. ``early-exit:N`` amateurs are the expert's first N
  layers (``cdlm.models.amateur.EarlyExitAmateur``) run as a standalone model.
* **Per-request settings through ``SamplingParams.extra_args["cdlm"]``** (``ContrastParams``), so
  greedy, sampled, CD and CID requests with different hyperparameters share one engine and batch.
  ``validate_params`` rejects bad settings when a request is submitted (HTTP 400 on the server).
* **Batch bookkeeping** follows vLLM's ``BatchUpdate`` (removed, added, moved/swapped indices) in
  ``RequestTable``; the state feeds the amateur "whatever it has not seen", so chunked-prefill steps
  and preemption (a request re-added with its output so far) need no special cases.
* The processor is not argmax-invariant, so vLLM applies it for greedy requests too; sampling
  parameters (temperature, top-k, top-p) then act on the contrastive scores, as in transformers.

Limits
------
* The amateur runs one request at a time (batch-1 forwards, no padding) in transformers, inside
  vLLM's sampling step, on the processor's device: it is not continuously batched, paged, or
  compiled, and it adds its full cost to every step. With a much smaller amateur on GPU that is
  the usual CD trade; with the expert itself (CID) or an early exit on CPU it dominates the step.
* Early-exit amateurs are recomputed by a second model (vLLM exposes no intermediate hidden states
  to logits processors), unlike the transformers path, which reads layer N off the expert's pass.
* Amateur and CID copies of the expert live outside vLLM's memory accounting (on GPU, leave room
  with ``gpu_memory_utilization``).
* No beam search (vLLM's beam search does not run custom processors per beam); no speculative
  decoding (vLLM rejects custom logits processors with it); prompts must be token ids or text (no
  prompt embeddings); async scheduling must stay off (``load_vllm`` turns it off).
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
    resolve_served_folder,
    runner_compatible,
)
from cdlm.decoding.vllm.params import EXTRA_ARGS_KEY, ContrastParams

PROCESSOR_FQCN = "cdlm.decoding.vllm.processors:ContrastiveLogitsProcessor"

__all__ = [
    "EXTRA_ARGS_KEY",
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
