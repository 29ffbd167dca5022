"""Run one task with one decoding method on one model: resumable, data-parallel, with a results JSON.

``evaluate`` is what ``cdlm eval`` and ``cdlm compare`` call. It knows tasks only through the
``Task`` interface (``cdlm.eval_harness.task``) and methods only through ``DecodingMethod``:

* ``generate_until`` requests go through the shared runner (``cdlm.decoding.runner.generate``) with
  the method, or through any function with the runner's signature (``generate_fn``; e.g. the vLLM
  backend's ``runner_compatible(load_vllm(...))``);
* ``loglikelihood`` requests are scored by transformers under the method's own scoring rule
  (``method.scoring_rule()``: plain log-likelihood, or expert minus weight x amateur / contrastive input).

Everything is validated (data, few-shot settings, chat template, the run signature against an existing
run) before anything is written. Under ``torchrun`` the processing chunks are dealt out to the ranks
(``cdlm.eval_harness.distributed``) and rank 0 merges the per-rank records into the same results as
one process.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from cdlm.eval_harness.distributed import current_shard
from cdlm.eval_harness.task import (
    GENERATE_UNTIL,
    PLAIN_LOGLIKELIHOOD,
    GenerationRequest,
    GenerationResponse,
    ScoringRule,
    Task,
    TaskData,
    get_task,
    task_names,
)
from cdlm.progress import track
from cdlm.run_identity import weights_fingerprint
from cdlm.runs import RunFolder, Shard, atomic_write_json


@dataclass
class EvalConfig:
    """What to evaluate; everything here goes into ``run.json`` and ``results.json``."""

    task: str
    limit: int | None = None
    num_fewshot: int | None = None  # None: the task's default (gsm8k 5, gsm8k_cot 8, hellaswag 0)
    data: str | None = None  # None: packaged copy; "hub"; or a jsonl(.gz) path
    fewshot_data: str | None = None  # gsm8k train rows (None: packaged train split)
    max_new_tokens: int = 256  # lm-eval's max_gen_toks default
    batch_size: int = 8
    seed: int = 0
    shared_context: bool = True  # loglikelihood: one context pass per example (False: lm-eval-style naive)
    apply_chat_template: bool = False  # each prompt as one user turn of the chat template, as lm-eval's flag
    extra: dict = field(default_factory=dict)  # task-specific settings (read by the task)

    def __post_init__(self):
        if self.task not in task_names():
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(task_names())}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be a positive number of examples, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")


@dataclass
class PreparedTask:
    """A task with its documents loaded and validated and one request per document."""

    task: Task
    data: TaskData
    requests: list


def prepare(config: EvalConfig) -> PreparedTask:
    """Load, validate and build every request; needs no model, so commands call it before loading one."""
    task = get_task(config.task)
    unknown = sorted(set(config.extra) - set(task.options))
    if unknown:
        takes = f"it takes {', '.join(task.options)}" if task.options else "it takes none"
        raise ValueError(f"task {task.name!r} has no option(s) {', '.join(unknown)}; {takes}")
    data = task.load(config)
    requests = task.build_requests(data, config)
    if len(requests) != len(data.docs):
        raise AssertionError(f"task {task.name!r} built {len(requests)} requests for {len(data.docs)} documents")
    return PreparedTask(task, data, requests)


def check_backend(task: str, backend: str) -> None:
    """Only generation tasks can use another generation backend; say so before anything loads."""
    if backend != "transformers" and get_task(task).output_type != GENERATE_UNTIL:
        raise ValueError(
            f"the {backend} backend generates text; task {task!r} is scored by log-likelihood with "
            f"transformers, so run it with --backend transformers"
        )


def scoring_rule_of(method) -> ScoringRule:
    """The method's log-likelihood scoring rule (plain log-likelihood without a method)."""
    return method.scoring_rule() if method is not None else PLAIN_LOGLIKELIHOOD


def _versions() -> dict:
    import torch
    import transformers

    from cdlm import __version__

    return {
        "cdlm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _method_record(method) -> dict:
    return {"method": "greedy"} if method is None else method.describe()


def _with_chat_template(requests: list, tokenizer) -> list:
    """lm-eval's ``--apply_chat_template`` (few-shot collapsed into one user turn): every prompt or
    context becomes one user message followed by the generation prompt; multiple-choice continuations
    then start the assistant turn, so their target delimiter is dropped."""
    from cdlm.models.prompts import render_prompts, uses_chat_template

    if not uses_chat_template(tokenizer):
        raise ValueError("--apply-chat-template was given but the model's tokenizer has no chat template")

    def render(text: str) -> str:
        return render_prompts(tokenizer, [text])[0]

    def render_optional(text: str | None) -> str | None:
        return None if text is None else render(text)

    out = []
    for request in requests:
        if isinstance(request, GenerationRequest):
            out.append(
                replace(
                    request,
                    prompt=render(request.prompt),
                    contrastive_prompt=render_optional(request.contrastive_prompt),
                )
            )
        else:
            out.append(
                replace(
                    request,
                    context=render(request.context),
                    contrastive_context=render_optional(request.contrastive_context),
                    target_delimiter="",
                )
            )
    return out


def _resumable_settings(task: Task) -> tuple[str, ...]:
    """Config fields a resumed run may change. ``limit`` only selects examples. ``batch_size`` only groups
    log-likelihood scoring; in generation the sampling seed follows the batches, so it is signed."""
    return ("limit",) if task.output_type == GENERATE_UNTIL else ("limit", "batch_size")


def check_fits_context(loaded, task: Task, requests: Sequence, method, config: EvalConfig) -> None:
    """Refuse, before anything is written, an example the model cannot see whole: positions past its context
    (``max_position_embeddings``) give scores and text of no meaning. Generation: prompt + token budget;
    log-likelihood: context + the longest continuation (what both the shared and the naive scorer feed)."""
    from cdlm.models.prompts import adds_special_tokens, context_length

    limit = context_length(loaded.model)
    if limit is None:
        return
    tokenizer = loaded.tokenizer
    add_special = adds_special_tokens(tokenizer, config.apply_chat_template)

    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]] if texts else []

    if task.output_type == GENERATE_UNTIL:
        fields = ["prompt"] + (["contrastive_prompt"] if getattr(method, "needs_contrastive_inputs", False) else [])
        for field_name in fields:
            for index, length in enumerate(lengths([getattr(r, field_name) for r in requests])):
                budget = requests[index].max_new_tokens or config.max_new_tokens
                if length + budget > limit:
                    raise ValueError(
                        f"{task.name} example {index}: the {field_name.replace('_', ' ')} has {length} tokens; with "
                        f"--max-new-tokens {budget} that is {length + budget} positions, more than the model's "
                        f"context of {limit}: lower --max-new-tokens or leave the example out of the data"
                    )
        return
    from cdlm.eval_harness.scoring import check_fits_model

    contrast = scoring_rule_of(method).contrast == "contrastive-input"
    for field_name in ["context"] + (["contrastive_context"] if contrast else []):
        check_fits_model(
            loaded.model,
            tokenizer,
            [(getattr(r, field_name) or "", r.continuations) for r in requests],
            add_special_tokens=add_special,
            what=f"{task.name} example",
            context_name=field_name.replace("_", " "),
        )


def _check_method_fits(task: Task, requests: Sequence, method, rule: ScoringRule) -> None:
    needs_contrast_input = (
        rule.contrast == "contrastive-input"
        if task.output_type != GENERATE_UNTIL
        else getattr(method, "needs_contrastive_inputs", False)
    )
    if needs_contrast_input:
        field_name = "contrastive_context" if task.output_type != GENERATE_UNTIL else "contrastive_prompt"
        if any(getattr(r, field_name) is None for r in requests):
            raise ValueError(
                f"method {method.name!r} needs a contrastive input; task {task.name!r} does not provide one"
            )


@dataclass
class _Plan:
    """What ``evaluate`` has checked and will run: the requests, the scoring rule, the records and the signature."""

    task: Task
    data: TaskData
    requests: list
    rule: ScoringRule
    method_record: dict
    model_record: dict
    scoring: dict | None
    backend: str
    signature: dict


def _plan(loaded, method, config: EvalConfig, generate_fn, prepared: PreparedTask | None) -> _Plan:
    """Every check that needs no run folder, and the run signature (see ``evaluate``)."""
    backend = getattr(generate_fn, "backend", "transformers") if generate_fn is not None else "transformers"
    check_backend(config.task, backend)
    prepared = prepared or prepare(config)
    task, data, requests = prepared.task, prepared.data, prepared.requests
    if config.apply_chat_template:
        requests = _with_chat_template(requests, loaded.tokenizer)
    rule = scoring_rule_of(method)
    _check_method_fits(task, requests, method, rule)
    check_fits_context(loaded, task, requests, method, config)
    method_record = _method_record(method)
    model_record = {"reference": loaded.reference, "source": loaded.source, **loaded.details}
    scoring = rule.describe() if task.output_type != GENERATE_UNTIL else None
    amateur_model = getattr(getattr(method, "amateur", None), "model", None)
    signature = {
        "task": task.describe(),
        "config": {k: v for k, v in asdict(config).items() if k not in _resumable_settings(task)},
        "data": data.fingerprints,
        "model": {
            "reference": loaded.reference,
            "weights": weights_fingerprint(loaded.model),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "device": loaded.model.device.type,
        },
        "method": method_record,
        "amateur_weights": weights_fingerprint(amateur_model) if amateur_model is not None else None,
        "scoring": scoring,
        "backend": backend,
    }
    return _Plan(task, data, requests, rule, method_record, model_record, scoring, backend, signature)


def check_run(
    loaded,
    method,
    config: EvalConfig,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    generate_fn: Callable | None = None,
    prepared: PreparedTask | None = None,
) -> None:
    """Raise what ``evaluate`` would refuse before computing (task and method, context lengths, a different
    run already in ``output_dir``) without writing anything: ``cdlm compare`` checks every method first."""
    plan = _plan(loaded, method, config, generate_fn, prepared)
    if not overwrite:
        RunFolder.check(output_dir, plan.signature)


def evaluate(
    loaded,
    method,
    config: EvalConfig,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    generate_fn: Callable | None = None,
    progress: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    prepared: PreparedTask | None = None,
    shard: Shard | None = None,
) -> dict:
    """Evaluate ``loaded`` (a ``LoadedModel``) with ``method`` (a ``DecodingMethod``) on ``config.task``.

    Writes ``run.json``, ``samples.jsonl`` and ``results.json`` under ``output_dir`` and returns the
    results dict. Finished examples already in the folder are reused (resume) if the run signature
    (data contents, weights, dtype, device, method, scoring rule, task version, backend, settings)
    is unchanged; otherwise the run is refused naming what changed.

    ``generate_fn`` replaces the transformers runner for generation tasks (same signature as
    ``cdlm.decoding.runner.generate``); its ``backend`` attribute, if any, names it in the signature.
    ``prepared``: the output of ``prepare(config)`` if the caller already validated the task.
    ``shard``: this process's part of a data-parallel run (default: from ``torch.distributed``).
    """
    shard = shard or current_shard()
    plan = _plan(loaded, method, config, generate_fn, prepared)
    task, data, requests, rule = plan.task, plan.data, plan.requests, plan.rule
    method_record, model_record, scoring, backend = plan.method_record, plan.model_record, plan.scoring, plan.backend
    signature = plan.signature
    run = RunFolder.open(output_dir, signature, overwrite=overwrite, shard=shard)
    finished = {i for i in run.finished() if i < len(requests)}  # a larger --limit earlier leaves extra records
    shard.barrier()  # every rank has read the finished records before any rank appends new ones
    chunks = _chunks(task, config, len(requests))
    mine = [[i for i in chunk if i not in finished] for k, chunk in enumerate(chunks) if shard.owns(k)]
    mine = [chunk for chunk in mine if chunk]
    todo_count = sum(map(len, mine))
    label = f"[{task.name} | {method_record['method']}" + (
        f" | rank {shard.rank}/{shard.world_size}]" if shard.world_size > 1 else "]"
    )
    if finished:
        progress(f"{label} resuming: {len(finished)}/{len(requests)} examples already done in {run.folder}")
    began = time.perf_counter()
    if mine:
        runner = _run_generation if task.output_type == GENERATE_UNTIL else _run_loglikelihood
        runner(loaded, method, rule, config, task, data.docs, requests, mine, run, label, progress, generate_fn)
    wall = time.perf_counter() - began
    shard.barrier()
    if shard.is_main:
        merged = run.merge()
        missing = [i for i in range(len(requests)) if i not in merged]
        if missing:
            raise RuntimeError(
                f"{run.folder} lacks {len(missing)} of {len(requests)} examples after the run (first: {missing[0]})"
            )
        payload = _results(
            task,
            config,
            data,
            [merged[i] for i in range(len(requests))],
            model_record,
            method_record,
            scoring,
            backend,
            run,
            wall,
            todo_count,
            shard,
        )
        atomic_write_json(run.results_path, payload)
    shard.barrier()
    if not shard.is_main:
        payload = run.read_results()
    return payload


def _results(
    task, config, data, records, model_record, method_record, scoring, backend, run, wall, todo_count, shard
) -> dict:
    seconds = sum(r["seconds"] for r in records)
    timing = {
        "seconds_total": seconds,
        "examples_per_second": len(records) / seconds if seconds else None,
        "wall_seconds_this_run": wall,
        "examples_this_run": todo_count if shard.world_size == 1 else None,
        "processes": shard.world_size,
    }
    if task.output_type == GENERATE_UNTIL:
        tokens = sum(r["num_tokens"] for r in records)
        timing.update(new_tokens=tokens, tokens_per_second=tokens / seconds if seconds else None)
    return {
        "task": task.name,
        "task_version": task.version,
        "results": task.aggregate(records),
        "n_samples": len(records),
        "primary_metric": task.primary_metric,
        "num_fewshot": task.num_fewshot(config),
        "higher_is_better": {name: True for name in task.metrics},
        "config": {**asdict(config), "data_source": data.source, "data_fingerprints": data.fingerprints},
        "model": model_record,
        "method": method_record,
        "scoring": scoring,
        "backend": backend,
        "versions": _versions(),
        "timing": timing,
        "samples": str(run.samples_path),
    }


def _chunks(task: Task, config: EvalConfig, count: int) -> list[list[int]]:
    """Fixed processing chunks over all documents: results are flushed per chunk, ranks own whole chunks.

    The boundaries depend only on the task type, the batch size and the number of documents, so a
    chunk is batched identically whichever process (or resumed run) computes it.
    """
    size = config.batch_size if task.output_type == GENERATE_UNTIL else max(config.batch_size * 4, 32)
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def _run_generation(
    loaded, method, rule, config, task, docs, requests, chunks, run, label, progress, generate_fn
) -> None:
    if generate_fn is None:
        from cdlm.decoding.runner import generate as generate_fn
    from cdlm.models.prompts import adds_special_tokens

    eos = loaded.tokenizer.eos_token
    add_special = adds_special_tokens(loaded.tokenizer, config.apply_chat_template)
    new_tokens, seconds = 0, 0.0
    with track(sum(map(len, chunks)), label, unit="example") as bar:
        for chunk in chunks:
            new_tokens_chunk, seconds_chunk = _generate_chunk(
                loaded, method, config, task, docs, requests, chunk, run, generate_fn, eos, add_special
            )
            new_tokens, seconds = new_tokens + new_tokens_chunk, seconds + seconds_chunk
            bar.update(len(chunk))
    progress(f"{label} generated {new_tokens} tokens, {new_tokens / seconds if seconds else 0.0:.1f} tokens/s")


def _generate_chunk(loaded, method, config, task, docs, requests, chunk, run, generate_fn, eos, add_special):
    """Generate and record one processing chunk; returns (new tokens, generation seconds)."""
    new_tokens, seconds = 0, 0.0
    # Requests in one call share the stop strings and budget; split the chunk where they differ.
    for group in _groups(chunk, lambda i: (requests[i].until, requests[i].max_new_tokens)):
        stop = list(requests[group[0]].until)
        if eos and eos not in stop:  # lm-eval's HF backend adds the decoded EOS to `until`
            stop.append(eos)
        contrastive = [requests[i].contrastive_prompt for i in group]
        kwargs = {} if add_special else {"add_special_tokens": False}
        generations, stats = generate_fn(
            loaded.model,
            loaded.tokenizer,
            [requests[i].prompt for i in group],
            method,
            max_new_tokens=requests[group[0]].max_new_tokens or config.max_new_tokens,
            batch_size=config.batch_size,
            contrastive_prompts=contrastive if getattr(method, "needs_contrastive_inputs", False) else None,
            stop=stop,
            seed=config.seed + group[0],
            **kwargs,
        )
        share = stats.seconds / len(group)
        records = []
        for index, generation in zip(group, generations):
            response = GenerationResponse(generation.text, len(generation.token_ids))
            record = task.process_result(docs[index], requests[index], response)
            records.append({"index": index, **record, "num_tokens": response.num_tokens, "seconds": share})
        run.append(records)
        new_tokens, seconds = new_tokens + stats.new_tokens, seconds + stats.seconds
    return new_tokens, seconds


def _groups(indices: list[int], key) -> list[list[int]]:
    groups: dict = {}
    for index in indices:
        groups.setdefault(key(index), []).append(index)
    return list(groups.values())


def _run_loglikelihood(
    loaded, method, rule, config, task, docs, requests, chunks, run, label, progress, generate_fn
) -> None:
    from cdlm.models.prompts import adds_special_tokens

    add_special = adds_special_tokens(loaded.tokenizer, config.apply_chat_template)
    with track(sum(map(len, chunks)), label, unit="example") as bar:
        for chunk in chunks:
            _score_chunk(loaded, rule, config, task, docs, requests, chunk, run, add_special)
            bar.update(len(chunk))


def _score_chunk(loaded, rule, config, task, docs, requests, chunk, run, add_special) -> None:
    """Score and record one processing chunk."""
    from cdlm.eval_harness.scoring import score_under_rule

    chunk_began = time.perf_counter()
    responses = score_under_rule(
        loaded.model,
        loaded.tokenizer,
        rule,
        [(requests[i].context, requests[i].continuations, requests[i].contrastive_context) for i in chunk],
        add_special_tokens=add_special,
        batch_size=config.batch_size,
        shared_context=config.shared_context,
    )
    elapsed = time.perf_counter() - chunk_began
    records = []
    for index, response in zip(chunk, responses):
        record = task.process_result(docs[index], requests[index], response)
        records.append({"index": index, **record, "seconds": elapsed / len(chunk)})
    run.append(records)
