"""Run one task with one decoding method on one model: resumable, with progress and a results JSON.

``evaluate`` is what ``cdlm eval`` and ``cdlm compare`` call. Generation tasks (``gsm8k``,
``gsm8k_cot``) go through the shared runner (``cdlm.decoding.runner.generate``) with any registered
method, or through any function with the runner's signature (``generate_fn``; e.g. the vLLM backend's
``runner_compatible(load_vllm(...))``); ``hellaswag`` is scored by log-likelihood, where the method chooses the scoring rule:

* ``cd``: contrastive scoring, ``expert_ll - beta * amateur_ll`` with the method's amateur and ``beta``;
* ``cid``: contrastive-input scoring, ``ll(ending | context) - cid_lambda * ll(ending | "Label:")``;
* any other method: plain log-likelihood (decoding methods do not change how a fixed text is scored).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from cdlm.eval_harness import gsm8k as gsm8k_task
from cdlm.eval_harness import hellaswag as hellaswag_task
from cdlm.eval_harness.data import load_rows, take, validate_rows
from cdlm.eval_harness.metrics import mean_and_stderr, multiple_choice_predictions
from cdlm.eval_harness.records import RunFolder, atomic_write_json

TASKS = ("gsm8k", "gsm8k_cot", "hellaswag")
GENERATION_TASKS = ("gsm8k", "gsm8k_cot")
PRIMARY_METRIC = {
    "gsm8k": "exact_match,strict-match",
    "gsm8k_cot": "exact_match,strict-match",
    "hellaswag": "acc_norm",
}


@dataclass
class EvalConfig:
    """What to evaluate; everything here goes into ``run.json`` and ``results.json``."""

    task: str
    limit: int | None = None
    num_fewshot: int | None = None  # None: the task's default (5, 8, 0)
    data: str | None = None  # None: packaged copy; "hub"; or a jsonl(.gz) path
    fewshot_data: str | None = None  # gsm8k train rows (None: packaged train split)
    max_new_tokens: int = 256  # lm-eval's max_gen_toks default
    batch_size: int = 8
    seed: int = 0
    shared_context: bool = True  # hellaswag: one context pass per example (False: lm-eval-style naive)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be a positive number of examples, got {self.limit}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")


def check_backend(task: str, backend: str) -> None:
    """Only generation tasks can use another generation backend; say so before anything loads."""
    if backend != "transformers" and task not in GENERATION_TASKS:
        raise ValueError(
            f"the {backend} backend generates text; task {task!r} is scored by log-likelihood with "
            f"transformers, so run it with --backend transformers"
        )


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


def load_task_docs(config: EvalConfig) -> tuple[list[dict], str, list[dict] | None]:
    """(docs, data source description, few-shot pool) for the task, validated and limited."""
    if config.task in GENERATION_TASKS:
        rows, source = load_rows(config.data, "gsm8k/test")
        validate_rows(rows, gsm8k_task.FIELDS, source)
        pool = None
        fmt = gsm8k_task.FORMATS[config.task]
        shots = fmt.num_fewshot if config.num_fewshot is None else config.num_fewshot
        if config.task == "gsm8k" and shots > 0:
            pool, pool_source = load_rows(config.fewshot_data, "gsm8k/train")
            validate_rows(pool, gsm8k_task.FIELDS, pool_source)
        return take(rows, config.limit), source, pool
    rows, source = load_rows(config.data, "hellaswag/validation")
    docs = hellaswag_task.process_rows(rows, source)
    return take(docs, config.limit), source, docs


def _hellaswag_scoring(method) -> dict:
    name = getattr(method, "name", "greedy")
    hp = getattr(method, "hyperparameters", {}) or {}
    if name == "cd":
        return {"scoring": "contrastive", "beta": float(hp.get("beta", 0.5)), "formula": "expert_ll - beta * amateur_ll"}
    if name == "cid":
        return {
            "scoring": "contrastive-input",
            "beta": float(hp.get("cid_lambda", 0.5)),
            "formula": "ll(ending | context) - beta * ll(ending | activity label)",
        }
    return {"scoring": "loglikelihood"}


def _method_record(method) -> dict:
    if method is None:
        return {"method": "greedy"}
    return method.describe()


def evaluate(
    loaded,
    method,
    config: EvalConfig,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    generate_fn: Callable | None = None,
    progress: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> dict:
    """Evaluate ``loaded`` (a ``LoadedModel``) with ``method`` (a ``DecodingMethod``) on ``config.task``.

    Writes ``run.json``, ``samples.jsonl`` and ``results.json`` under ``output_dir`` and returns the
    results dict. Finished examples already in ``samples.jsonl`` are reused (resume).

    ``generate_fn`` replaces the transformers runner for generation tasks (same signature as
    ``cdlm.decoding.runner.generate``); its ``backend`` attribute, if any, names it in the run's
    signature, so a run is never resumed with outputs from a different backend. Log-likelihood
    tasks are scored by transformers and reject another backend rather than silently ignoring it.
    """
    backend = getattr(generate_fn, "backend", "transformers") if generate_fn is not None else "transformers"
    check_backend(config.task, backend)
    docs, source, pool = load_task_docs(config)
    method_record = _method_record(method)
    model_record = {"reference": loaded.reference, "source": loaded.source, **loaded.details}
    scoring = _hellaswag_scoring(method) if config.task == "hellaswag" else None
    signature = {
        "task": config.task,
        "config": {k: v for k, v in asdict(config).items() if k not in ("batch_size", "limit")},
        "model": loaded.reference,
        "method": method_record,
        "scoring": scoring,
        "backend": backend,
    }
    run = RunFolder(output_dir, signature, overwrite=overwrite)
    finished = run.finished()
    todo = [i for i in range(len(docs)) if i not in finished]
    label = f"[{config.task} | {method_record['method']}]"
    if finished:
        progress(f"{label} resuming: {len(docs) - len(todo)}/{len(docs)} examples already done in {run.folder}")
    began = time.perf_counter()
    if todo:
        if config.task in GENERATION_TASKS:
            _run_gsm8k(loaded, method, config, docs, pool, todo, run, label, progress, generate_fn)
        else:
            _run_hellaswag(loaded, method, config, docs, pool, todo, run, scoring, label, progress)
    wall = time.perf_counter() - began
    records = run.finished()
    records = [records[i] for i in range(len(docs)) if i in records]
    if len(records) != len(docs):
        raise RuntimeError(f"{run.samples_path} has {len(records)} of {len(docs)} examples after the run")
    results = _summarise(config, records)
    seconds = sum(r["seconds"] for r in records)
    timing = {
        "seconds_total": seconds,
        "examples_per_second": len(records) / seconds if seconds else None,
        "wall_seconds_this_run": wall,
        "examples_this_run": len(todo),
    }
    if config.task in GENERATION_TASKS:
        tokens = sum(r["num_tokens"] for r in records)
        timing.update(new_tokens=tokens, tokens_per_second=tokens / seconds if seconds else None)
    payload = {
        "task": config.task,
        "results": results,
        "n_samples": len(records),
        "primary_metric": PRIMARY_METRIC[config.task],
        "config": {**asdict(config), "data_source": source},
        "model": model_record,
        "method": method_record,
        "scoring": scoring,
        "backend": backend,
        "versions": _versions(),
        "timing": timing,
        "samples": str(run.samples_path),
    }
    atomic_write_json(run.results_path, payload)
    return payload


def _summarise(config: EvalConfig, records: list[dict]) -> dict:
    if config.task in GENERATION_TASKS:
        names = ["exact_match,strict-match", "exact_match,flexible-extract"]
    else:
        names = ["acc", "acc_norm"]
    results = {}
    for name in names:
        mean, stderr = mean_and_stderr([r[name] for r in records])
        results[name] = mean
        results[name.replace(",", "_stderr,") if "," in name else name + "_stderr"] = stderr
    return results


def _run_gsm8k(loaded, method, config, docs, pool, todo, run, label, progress, generate_fn) -> None:
    if generate_fn is None:
        from cdlm.decoding.runner import generate as generate_fn

    fmt = gsm8k_task.FORMATS[config.task]
    prompts = gsm8k_task.build_prompts(fmt, docs, pool, config.num_fewshot)
    contrastive = gsm8k_task.contrastive_prompts(fmt, docs) if method.needs_contrastive_inputs else None
    stop = list(fmt.until)
    eos = loaded.tokenizer.eos_token
    if eos and eos not in stop:  # lm-eval's HF backend adds the decoded EOS to `until`
        stop.append(eos)
    # Chunks of a few batches: the JSONL grows as we go, so an interrupted run loses at most one chunk.
    chunk_size = config.batch_size
    done = len(docs) - len(todo)
    started = time.perf_counter()
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        generations, stats = generate_fn(
            loaded.model,
            loaded.tokenizer,
            [prompts[i] for i in chunk],
            method,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            contrastive_prompts=[contrastive[i] for i in chunk] if contrastive else None,
            stop=stop,
            seed=config.seed + chunk[0],
        )
        share = stats.seconds / len(chunk)
        records = []
        for index, generation in zip(chunk, generations):
            doc = docs[index]
            records.append(
                {
                    "index": index,
                    "question": doc["question"],
                    "target": fmt.reference(doc),
                    "prompt": prompts[index],
                    "contrastive_prompt": contrastive[index] if contrastive else None,
                    "response": generation.text,
                    "num_tokens": len(generation.token_ids),
                    **gsm8k_task.score(fmt, generation.text, doc),
                    "seconds": share,
                }
            )
        run.append(records)
        done += len(chunk)
        elapsed = time.perf_counter() - started
        progress(f"{label} {done}/{len(docs)} examples, {stats.tokens_per_second:.1f} tokens/s, {elapsed:.0f}s")


def _run_hellaswag(loaded, method, config, docs, pool, todo, run, scoring, label, progress) -> None:
    from cdlm.eval_harness.scoring import encode_request, score_requests

    tokenizer, model = loaded.tokenizer, loaded.model
    num_fewshot = config.num_fewshot or 0
    all_contexts = hellaswag_task.contexts(docs, num_fewshot, pool)
    selected = [docs[i] for i in todo]
    contexts = [all_contexts[i] for i in todo]
    requests = [encode_request(tokenizer, ctx, hellaswag_task.continuations(d)) for ctx, d in zip(contexts, selected)]
    amateur = getattr(method, "amateur", None) if scoring["scoring"] == "contrastive" else None
    early_exit = amateur if getattr(amateur, "kind", None) == "early-exit" else None
    # Score in chunks so finished examples reach the JSONL (resume) and progress shows.
    chunk_size = max(config.batch_size * 4, 32)
    started = time.perf_counter()
    done = len(docs) - len(todo)
    for start in range(0, len(todo), chunk_size):
        span = slice(start, start + chunk_size)
        chunk_began = time.perf_counter()
        kwargs = {"batch_size": config.batch_size, "shared_context": config.shared_context}
        expert, amateur_scores = score_requests(model, tokenizer, requests[span], early_exit=early_exit, **kwargs)
        if amateur is not None and early_exit is None:  # a separate amateur scores the same token sequences
            amateur_scores, _ = score_requests(amateur.model, tokenizer, requests[span], **kwargs)
        contrast_scores = None
        if scoring["scoring"] == "contrastive-input":
            contrast_contexts = hellaswag_task.contrastive_contexts(selected[span])
            contrast_requests = [
                encode_request(tokenizer, ctx, hellaswag_task.continuations(d)) for ctx, d in zip(contrast_contexts, selected[span])
            ]
            contrast_scores, _ = score_requests(model, tokenizer, contrast_requests, **kwargs)
        elapsed = time.perf_counter() - chunk_began
        records = []
        for offset, index in enumerate(todo[span]):
            doc = docs[index]
            expert_ll = [s.loglikelihood for s in expert[offset]]
            if scoring["scoring"] == "contrastive":
                amateur_ll = [s.loglikelihood for s in amateur_scores[offset]]
                scores = [e - scoring["beta"] * a for e, a in zip(expert_ll, amateur_ll)]
            elif scoring["scoring"] == "contrastive-input":
                amateur_ll = [s.loglikelihood for s in contrast_scores[offset]]
                scores = [e - scoring["beta"] * a for e, a in zip(expert_ll, amateur_ll)]
            else:
                amateur_ll, scores = None, expert_ll
            pred, pred_norm = multiple_choice_predictions(scores, doc["choices"])
            records.append(
                {
                    "index": index,
                    "gold": doc["gold"],
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "acc": float(pred == doc["gold"]),
                    "acc_norm": float(pred_norm == doc["gold"]),
                    "scores": scores,
                    "expert_loglikelihoods": expert_ll,
                    "contrast_loglikelihoods": amateur_ll,
                    "is_greedy": [s.is_greedy for s in expert[offset]],
                    "num_tokens": [s.num_tokens for s in expert[offset]],
                    "seconds": elapsed / len(todo[span]),
                }
            )
        run.append(records)
        done += len(records)
        total = time.perf_counter() - started
        progress(f"{label} {done}/{len(docs)} examples, {(done - (len(docs) - len(todo))) / total:.1f} examples/s")
