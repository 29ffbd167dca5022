"""``cdlm eval`` (one task, one method) and ``cdlm compare`` (several methods, same examples, one table/plot).

Both run data-parallel under ``torchrun --nproc_per_node N`` (see ``cdlm.eval_harness.distributed``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdlm.cli.common import (
    add_backend_argument,
    add_method_arguments,
    add_model_arguments,
    build_method,
    check_method_settings,
    generator_from_args,
    load_from_args,
    progress,
)
from cdlm.decoding.methods import _METHODS
from cdlm.eval_harness.task import task_names


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task")
    group.add_argument("--task", required=True, help=f"one of {', '.join(task_names())}")
    group.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (N > 0)")
    group.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot exemplars (default: gsm8k 5, gsm8k_cot 8, hellaswag 0)"
    )
    group.add_argument(
        "--data", default=None, help="a jsonl(.gz) file of task rows, or 'hub' (default: the packaged copy)"
    )
    group.add_argument("--fewshot-data", default=None, help="gsm8k: jsonl file of train rows for the exemplars")
    group.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks: token budget (lm-eval: 256)")
    group.add_argument("--batch-size", type=int, default=8, help="examples per forward/generate batch")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--naive-scoring", action="store_true", help="hellaswag: one full forward per ending (lm-eval style)"
    )
    group.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="render each prompt as one user turn of the model's chat template (lm-eval's --apply_chat_template)",
    )
    group.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task-specific setting (repeatable; e.g. openended: domain=wikihow); recorded in the run signature",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="discard a previous run in --output-dir instead of resuming"
    )
    add_backend_argument(group)  # type: ignore[arg-type]
    group.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vLLM backend: GPUs per engine (tensor parallel)"
    )
    group.add_argument(
        "--data-parallel-size", type=int, default=1, help="vLLM backend: engine replicas (data parallel)"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a decoding method on GSM8K or HellaSwag",
        description="Evaluate one decoding method on gsm8k, gsm8k_cot or hellaswag (lm-eval 0.4.x formats). "
        "Rerunning with the same --output-dir resumes.",
    )
    add_model_arguments(parser)
    add_method_arguments(parser)
    _add_task_arguments(parser)
    parser.add_argument(
        "--output-dir",
        default=None,
        help="run folder (default: runs/eval/<task>-<method>-<hash of the settings that change results>)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as one JSON line instead of a table (JSON lines)"
    )
    parser.set_defaults(func=run_eval)

    compare = subparsers.add_parser(
        "compare",
        help="compare several decoding methods on the same examples",
        description="Run several methods on the same task examples and print one table (+ PNG plot).",
    )
    add_model_arguments(compare)
    add_method_arguments(compare, multiple=True)
    _add_task_arguments(compare)
    compare.add_argument(
        "--output-dir",
        default=None,
        help="folder for per-method runs + compare.{json,md,png} "
        "(default: runs/compare/<task>-<hash of the methods and settings>)",
    )
    compare.add_argument(
        "--json", action="store_true", help="print each method's results as one JSON line instead of a table"
    )
    compare.set_defaults(func=run_compare)


def _check_task_and_methods(args: argparse.Namespace, methods: list[str]) -> None:
    """Task, backend, method names and every method's hyperparameters, checked before any model loads."""
    from cdlm.eval_harness.evaluate import check_backend

    if args.task not in task_names():
        raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(task_names())}")
    check_backend(args.task, args.backend)
    if not methods:
        raise ValueError("no methods given")
    for name in methods:
        if name not in _METHODS:
            raise ValueError(f"unknown decoding method {name!r}; known methods: {', '.join(_METHODS)}")
    check_method_settings(args, methods)  # every method's settings; flags no chosen method uses are refused


def _config(args: argparse.Namespace):
    from cdlm.eval_harness import EvalConfig

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be a positive number of examples, got {args.limit}")
    return EvalConfig(
        task=args.task,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        data=args.data,
        fewshot_data=args.fewshot_data,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        shared_context=not args.naive_scoring,
        apply_chat_template=args.apply_chat_template,
        extra=_task_options(args.task_option),
    )


def _task_options(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--task-option takes KEY=VALUE, got {pair!r}")
        if key.strip() in options:
            raise ValueError(f"--task-option {key.strip()!r} is given twice")
        options[key.strip()] = value.strip()
    return options


def _engine_options(args: argparse.Namespace) -> dict:
    """The vLLM engine's parallelism options (only those asked for, so the defaults stay vLLM's)."""
    for flag in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if getattr(args, flag) > 1 and args.backend != "vllm":
            raise ValueError(f"--{flag.replace('_', '-')} is a vLLM engine option; add --backend vllm")
    return {k: getattr(args, k) for k in ("tensor_parallel_size", "data_parallel_size") if getattr(args, k) > 1}


def _prepare(args: argparse.Namespace):
    """Validate everything that needs no model (task data, few-shot settings, engine options), join the
    process group when launched by torchrun, and load the model on this rank's device."""
    from cdlm.eval_harness import prepare
    from cdlm.eval_harness.distributed import init_from_launcher, local_device

    config = _config(args)
    prepared = prepare(config)
    engine_options = _engine_options(args)
    shard = init_from_launcher()
    args.device = local_device(args.device, shard)
    loaded = load_from_args(args)
    return config, prepared, engine_options, shard, loaded


# Flags that change what a run computes (``--limit`` only selects examples, so a larger one resumes).
_RUN_SETTINGS = (
    "model",
    "gguf_file",
    "dtype",
    "device",
    "amateur",
    "data",
    "fewshot_data",
    "num_fewshot",
    "max_new_tokens",
    "seed",
    "naive_scoring",
    "apply_chat_template",
    "backend",
)


def default_output_dir(args: argparse.Namespace, kind: str, methods: list[str]) -> Path:
    """``runs/<kind>/<task>[-<method>]-<hash>``: runs that differ in any setting that changes results get
    different folders, so following one documented command with another never hits a resume refusal."""
    import hashlib

    from cdlm.decoding.methods import get_method
    from cdlm.eval_harness.task import GENERATE_UNTIL, get_task

    settings = {name: getattr(args, name, None) for name in _RUN_SETTINGS}
    settings["task_options"] = sorted(args.task_option)
    settings["methods"] = methods
    names = sorted({p.name for method in methods for p in get_method(method).params})
    settings["hyperparameters"] = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if get_task(args.task).output_type == GENERATE_UNTIL:  # generation seeds follow the batches
        settings["batch_size"] = args.batch_size
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{args.task}-{methods[0]}" if kind == "eval" else args.task
    return Path("runs") / kind / f"{name}-{digest}"


def _print_json_lines(results: list[dict]) -> None:
    """One result per line (cdlm's convention for every stream of records, as ``generate --json``)."""
    from cdlm.textio import dumps_line

    for result in results:
        print(dumps_line(json.loads(json.dumps(result, default=str))), flush=True)


def _write_lm_eval_layout(result: dict, output: Path) -> Path:
    from cdlm.eval_harness.report import lm_eval_layout
    from cdlm.runs import atomic_write_json

    path = output / "results_lm_eval.json"
    atomic_write_json(path, lm_eval_layout(result))
    return path


def run_eval(args: argparse.Namespace) -> int:
    from cdlm.eval_harness import evaluate
    from cdlm.eval_harness.report import text_table

    _check_task_and_methods(args, [args.method])
    config, prepared, engine_options, shard, loaded = _prepare(args)
    method = build_method(args.method, args, loaded, {})
    output = Path(args.output_dir) if args.output_dir else default_output_dir(args, "eval", [args.method])
    progress(f"run folder: {output}")
    result = evaluate(
        loaded,
        method,
        config,
        output,
        overwrite=args.overwrite,
        generate_fn=generator_from_args(args, **engine_options),
        progress=progress,
        prepared=prepared,
        shard=shard,
    )
    if not shard.is_main:
        return 0
    lm_eval_path = _write_lm_eval_layout(result, output)
    if args.json:
        _print_json_lines([result])
    else:
        print(text_table([result]), end="")
        progress(f"results: {output / 'results.json'} (lm-eval layout: {lm_eval_path.name})")
        progress(f"per-example outputs: {output / 'samples.jsonl'}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from cdlm.eval_harness import evaluate
    from cdlm.eval_harness.evaluate import check_run
    from cdlm.eval_harness.report import markdown_table, plot, text_table
    from cdlm.runs import atomic_write_json, atomic_write_text

    methods = list(dict.fromkeys(args.method or ["greedy"]))
    _check_task_and_methods(args, methods)
    config, prepared, engine_options, shard, loaded = _prepare(args)
    generate_fn = generator_from_args(args, **engine_options)
    output = Path(args.output_dir) if args.output_dir else default_output_dir(args, "compare", methods)
    progress(f"run folder: {output}")
    amateurs: dict = {}
    # Every method (and amateur) is built before the first one runs: a failure here costs no generation.
    built = {name: build_method(name, args, loaded, amateurs) for name in methods}
    for name, method in built.items():  # ... and every run is checked before the first computes
        check_run(
            loaded,
            method,
            config,
            output / name,
            overwrite=args.overwrite,
            generate_fn=generate_fn,
            prepared=prepared,
        )
    results = []
    for name, method in built.items():
        results.append(
            evaluate(
                loaded,
                method,
                config,
                output / name,
                overwrite=args.overwrite,
                generate_fn=generate_fn,
                progress=progress,
                prepared=prepared,
                shard=shard,
            )
        )
        if shard.is_main:
            _write_lm_eval_layout(results[-1], output / name)
    if not shard.is_main:
        return 0
    atomic_write_json(output / "compare.json", {"task": args.task, "methods": methods, "runs": results})
    atomic_write_text(output / "compare.md", markdown_table(results))
    picture = plot(
        results, output / "compare.png", title=f"{args.task} ({loaded.reference}, n={results[0]['n_samples']})"
    )
    if args.json:
        _print_json_lines(results)
    else:
        print(text_table(results), end="")
    progress(
        f"table: {output / 'compare.md'}" + (f"; plot: {picture}" if picture else " (install matplotlib for a plot)")
    )
    return 0
