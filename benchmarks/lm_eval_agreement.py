"""Check cdlm's eval harness against lm-evaluation-harness 0.4.x on the same model and documents.

    python benchmarks/lm_eval_agreement.py --hellaswag-docs 300 --gsm8k-docs 20

What it does (rerunnable; lm-eval lives in its own venv so cdlm's stays untouched):

1. Sets up ``.venv-lmeval`` if missing: ``pip install torch==2.13.0 transformers==5.19.0 lm-eval[hf]==0.4.13``,
   plus cdlm itself (``pip install --no-deps -e .``) for ``cdlm-lm-eval --model cdlm`` (``cdlm.eval_harness.lm_eval_model``).
2. Writes the documents to local jsonl files and lm-eval task YAMLs (the packaged templates in ``cdlm/data/lm_eval_tasks``,
   ``dataset_path: json``): HellaSwag from the packaged ``validation_olmo1000`` file (the exact lm-eval
   rendering of 1,000 validation docs) and GSM8K test/train.
3. Runs lm-eval's HF backend on cdlm's cached safetensors folder of the model (the folder
   ``cdlm.models.loading.cached_gguf_folder`` made from the GGUF), float32 on CPU, and times it.
4. Runs cdlm on the same documents: shared-context scoring for HellaSwag, the shared runner with
   greedy decoding for GSM8K.
5. Compares per-choice log-likelihoods (|diff| <= 1e-3), predicted endings, the exact context /
   continuation strings and prompts lm-eval built, GSM8K responses, extracted answers and scores; writes
   ``benchmarks/results/eval_lm_eval_agreement.{json,md}`` and, with ``--write-fixture K``, a small
   fixture of lm-eval's per-choice log-likelihoods (first K HellaSwag docs) and greedy GSM8K responses
   (first min(K, 3) problems) for ``tests/test_eval_scoring.py`` and ``tests/test_eval_harness.py``.

Tokenisation: lm-eval 0.4.13's HF backend encodes with the tokenizer's default special tokens
(``add_bos_token=None``); cdlm's ``encode_pair`` does the same, so both sides score the same token
ids (for SmolLM2 the tokenizer adds no BOS; the script records the context ids of the first doc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _machine import describe_machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
MACHINE = describe_machine()  # taken at start, before this run loads the cores

DRIVER = r"""
import json, sys, time
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
spec = json.loads(sys.argv[1])
lm = HFLM(pretrained=spec["model"], dtype="float32", device="cpu", batch_size=spec["batch_size"])
manager = TaskManager(include_path=spec["include"])
out = {}
for task, limit in spec["tasks"].items():
    began = time.perf_counter()
    result = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                             bootstrap_iters=0, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                             fewshot_random_seed=1234)
    seconds = time.perf_counter() - began
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    out[task] = {"seconds": seconds, "results": result["results"][task], "samples": [
        {"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"],
         "filtered_resps": s["filtered_resps"],
         **{k: s[k] for k in s if k.startswith("exact_match") or k in ("acc", "acc_norm")}} for s in samples]}
    print(f"lm-eval {task}: {len(samples)} docs in {seconds:.1f}s", file=sys.stderr, flush=True)
json.dump(out, open(spec["output"], "w"), default=str)
"""


def _args_strings(argument) -> tuple:
    """lm-eval logs request arguments as tuples or as {"gen_args_0": {"arg_0": ..}} dicts."""
    if isinstance(argument, dict):
        inner = next(iter(argument.values())) if "arg_0" not in argument else argument
        return tuple(inner[k] for k in sorted(inner))
    return tuple(argument)


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "torch==2.13.0",
                "transformers==5.19.0",
                "lm-eval[hf]==0.4.13",
            ],
            check=True,
        )
    if subprocess.run([str(python), "-c", "import cdlm"], capture_output=True, cwd="/").returncode != 0:
        # cdlm itself (no dependencies: the venv's torch/transformers are the ones under test), so that
        # `cdlm-lm-eval --model cdlm ...` and tests/test_eval_lm_eval_model.py run there.
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    return python


def model_folder(name: str) -> Path:
    from cdlm.models import cache_root
    from cdlm.models.loading import cached_gguf_folder
    from cdlm.models.registry import get_registered

    registered = get_registered(name)
    if registered is None:
        return Path(name)
    return cached_gguf_folder(registered.gguf_path(cache_root() / "gguf"))[0]


def write_inputs(workdir: Path, hellaswag_docs: int, gsm8k_docs: int) -> Path:
    from cdlm.eval_harness.data import packaged_path, read_jsonl
    from cdlm.eval_harness.lm_eval_tasks import write_task_dir

    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "hellaswag.jsonl": read_jsonl(packaged_path("hellaswag/validation_olmo1000"))[:hellaswag_docs],
        "gsm8k_test.jsonl": read_jsonl(packaged_path("gsm8k/test"))[:gsm8k_docs],
        "gsm8k_train.jsonl": read_jsonl(packaged_path("gsm8k/train")),
    }
    for name, rows in files.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    include = workdir / "tasks"
    include.mkdir(exist_ok=True)
    replacements = {
        "__DATA__": str(data / "hellaswag.jsonl"),
        "__TRAIN__": str(data / "gsm8k_train.jsonl"),
        "__TEST__": str(data / "gsm8k_test.jsonl"),
    }
    return write_task_dir(include, replacements)


def run_lm_eval(python: Path, folder: Path, include: Path, workdir: Path, tasks: dict, batch_size: int) -> dict:
    output = workdir / "lm_eval_out.json"
    driver = workdir / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    spec = {
        "model": str(folder),
        "batch_size": batch_size,
        "include": str(include),
        "tasks": tasks,
        "output": str(output),
    }
    subprocess.run([str(python), str(driver), json.dumps(spec)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(output.read_text())


def compare_hellaswag(loaded, lm_eval_out: dict, docs: list[dict], batch_size: int) -> dict:
    from cdlm.eval_harness.metrics import multiple_choice_predictions
    from cdlm.eval_harness.scoring import encode_request, score_requests

    samples = lm_eval_out["samples"]
    docs = docs[: len(samples)]
    # Score exactly the (context, continuation) strings lm-eval scored.
    requests_text = []
    string_mismatch = 0
    for doc, sample in zip(docs, samples):
        pairs = [_args_strings(a) for a in sample["arguments"]]
        context = pairs[0][0]
        if context != doc["query"] or [p[1] for p in pairs] != [" " + c for c in doc["choices"]]:
            string_mismatch += 1
        requests_text.append((context, [p[1] for p in pairs]))
    requests = [encode_request(loaded.tokenizer, c, conts) for c, conts in requests_text]
    began = time.perf_counter()
    ours, _ = score_requests(loaded.model, loaded.tokenizer, requests, batch_size=batch_size)
    seconds = time.perf_counter() - began
    diffs, same_pred, same_norm, theirs_acc, ours_acc = [], 0, 0, [], []
    for doc, sample, scores in zip(docs, samples, ours):
        theirs = [float(r[0][0]) for r in sample["resps"]]
        mine = [s.loglikelihood for s in scores]
        diffs += [abs(a - b) for a, b in zip(theirs, mine)]
        p_t = multiple_choice_predictions(theirs, doc["choices"])
        p_o = multiple_choice_predictions(mine, doc["choices"])
        same_pred += p_t[0] == p_o[0]
        same_norm += p_t[1] == p_o[1]
        ours_acc.append((p_o[0] == doc["gold"], p_o[1] == doc["gold"]))
        theirs_acc.append((sample.get("acc"), sample.get("acc_norm")))
    n = len(docs)
    return {
        "docs": n,
        "max_abs_loglik_diff": max(diffs),
        "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "choices_within_1e-3": sum(d <= 1e-3 for d in diffs) / len(diffs),
        "same_prediction_acc": same_pred / n,
        "same_prediction_acc_norm": same_norm / n,
        "context_or_choice_string_mismatches": string_mismatch,
        "lm_eval": {
            "acc": lm_eval_out["results"].get("acc,none"),
            "acc_norm": lm_eval_out["results"].get("acc_norm,none"),
            "seconds": lm_eval_out["seconds"],
            "examples_per_second": n / lm_eval_out["seconds"],
        },
        "cdlm": {
            "acc": sum(a for a, _ in ours_acc) / n,
            "acc_norm": sum(b for _, b in ours_acc) / n,
            "seconds": seconds,
            "examples_per_second": n / seconds,
        },
        "speedup_examples_per_second": (n / seconds) / (n / lm_eval_out["seconds"]),
        "_ours": [[s.loglikelihood for s in scores] for scores in ours],
        "_requests": requests,
    }


def compare_gsm8k(loaded, lm_eval_out: dict, batch_size: int) -> dict:
    from cdlm.decoding.methods import get_method
    from cdlm.decoding.runner import generate
    from cdlm.eval_harness.data import packaged_path, read_jsonl
    from cdlm.eval_harness.tasks import gsm8k as task

    samples = _gsm8k_samples(lm_eval_out)
    rows = read_jsonl(packaged_path("gsm8k/test"))[: len(samples)]
    prompts = task.build_prompts(task.GSM8K, rows, read_jsonl(packaged_path("gsm8k/train")))
    same_prompt = sum(_args_strings(s["arguments"][0])[0] == p for s, p in zip(samples, prompts))
    stop = list(task.GSM8K.until) + [loaded.tokenizer.eos_token]
    began = time.perf_counter()
    generations, stats = generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        get_method("greedy")(loaded.model, loaded.tokenizer),
        max_new_tokens=256,
        batch_size=batch_size,
        stop=stop,
    )
    seconds = time.perf_counter() - began
    same_text = same_strict = 0
    details = []
    for sample, row, generation in zip(samples, rows, generations):
        theirs = sample["resps"][0][0]
        ours = task.score(task.GSM8K, generation.text, row)
        same_text += theirs == generation.text
        same_strict += ours["exact_match,strict-match"] == sample.get(
            "exact_match,strict-match", sample.get("exact_match")
        )
        if theirs != generation.text:
            details.append({"doc_id": sample["doc_id"], "lm_eval": theirs, "cdlm": generation.text})
    n = len(samples)
    ours_scores = [task.score(task.GSM8K, g.text, r) for g, r in zip(generations, rows)]
    return {
        "docs": n,
        "same_prompt": same_prompt / n,
        "same_response": same_text / n,
        "same_strict_match_score": same_strict / n,
        "lm_eval": {k: v for k, v in lm_eval_out["results"].items() if k.startswith("exact_match")}
        | {"seconds": lm_eval_out["seconds"]},
        "cdlm": {
            "exact_match,strict-match": sum(s["exact_match,strict-match"] for s in ours_scores) / n,
            "exact_match,flexible-extract": sum(s["exact_match,flexible-extract"] for s in ours_scores) / n,
            "seconds": seconds,
            "tokens_per_second": stats.tokens_per_second,
        },
        "differing_responses": details[:5],
    }


def _gsm8k_samples(lm_eval_task_out: dict) -> list[dict]:
    """One sample per document (lm-eval logs one per filter; strict-match and flexible-extract share a generation)."""
    return sorted({s["doc_id"]: s for s in lm_eval_task_out["samples"]}.values(), key=lambda s: s["doc_id"])


def write_gsm8k_fixture(lm_eval_task_out: dict, model: str, k: int) -> None:
    from cdlm.runs import atomic_write_json

    samples = _gsm8k_samples(lm_eval_task_out)[:k]
    fixture = {
        "model": model,
        "lm_eval_version": "0.4.13",
        "task": "gsm8k (5-shot, greedy, max_gen_toks 256)",
        "problems": [
            {
                "doc_id": s["doc_id"],
                "prompt": _args_strings(s["arguments"][0])[0],
                "lm_eval_response": s["resps"][0][0],
                "strict_match": s.get("exact_match,strict-match", s.get("exact_match")),
            }
            for s in samples
        ],
    }
    atomic_write_json(ROOT / "tests" / "fixtures" / "lm_eval_gsm8k_smollm2.json", fixture)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hellaswag-docs", type=int, default=300)
    parser.add_argument("--gsm8k-docs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--venv", default=str(ROOT / ".venv-lmeval"))
    parser.add_argument("--workdir", default="/tmp/cdlm_lm_eval_agreement")
    parser.add_argument(
        "--reuse-lm-eval", action="store_true", help="reuse the lm-eval outputs of a previous run in --workdir"
    )
    parser.add_argument(
        "--write-fixture",
        type=int,
        default=0,
        help="store lm-eval's log-likelihoods of the first K HellaSwag docs and its first min(K, 3) GSM8K responses",
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "eval_lm_eval_agreement"))
    args = parser.parse_args()

    import torch

    from cdlm.eval_harness.data import packaged_path, read_jsonl
    from cdlm.models import load_model
    from cdlm.runs import atomic_write_json, atomic_write_text

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model)
    include = write_inputs(workdir, args.hellaswag_docs, args.gsm8k_docs)
    tasks = {}
    if args.hellaswag_docs:
        tasks["cdlm_hellaswag_processed"] = args.hellaswag_docs
    if args.gsm8k_docs:
        tasks["cdlm_gsm8k"] = args.gsm8k_docs
    cached = workdir / "lm_eval_out.json"
    if args.reuse_lm_eval and cached.exists():
        lm_eval_out = json.loads(cached.read_text())
    else:
        lm_eval_out = run_lm_eval(ensure_venv(Path(args.venv)), folder, include, workdir, tasks, args.batch_size)
    loaded = load_model(str(folder), dtype="float32", device="cpu")
    report = {
        "model": args.model,
        "model_folder": str(folder),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": MACHINE,
        "lm_eval_version": "0.4.13",
        "first_doc_context_ids_start": loaded.tokenizer.encode("High jump:")[:4],
        "tokenizer_adds_bos": loaded.tokenizer.encode("x") != loaded.tokenizer.encode("x", add_special_tokens=False),
    }
    if "cdlm_hellaswag_processed" in lm_eval_out:
        docs = read_jsonl(packaged_path("hellaswag/validation_olmo1000"))
        hs = compare_hellaswag(loaded, lm_eval_out["cdlm_hellaswag_processed"], docs, args.batch_size)
        hs.pop("_ours")
        requests = hs.pop("_requests")
        report["hellaswag"] = hs
        print(json.dumps(hs, indent=2), flush=True)
        if args.write_fixture:
            k = args.write_fixture
            fixture = {
                "model": args.model,
                "lm_eval_version": "0.4.13",
                "source": "hellaswag_val_olmo1000_lmeval_processed (first docs)",
                "docs": [
                    {
                        "query": d["query"],
                        "choices": d["choices"],
                        "gold": d["gold"],
                        "context_ids": r.context,
                        "continuation_ids": r.continuations,
                        "lm_eval_loglikelihoods": [float(x[0][0]) for x in s["resps"]],
                    }
                    for d, r, s in zip(docs[:k], requests[:k], lm_eval_out["cdlm_hellaswag_processed"]["samples"][:k])
                ],
            }
            atomic_write_json(ROOT / "tests" / "fixtures" / "lm_eval_hellaswag_smollm2.json", fixture)
    if "cdlm_gsm8k" in lm_eval_out:
        if args.write_fixture:
            write_gsm8k_fixture(lm_eval_out["cdlm_gsm8k"], args.model, min(args.write_fixture, 3))
        report["gsm8k"] = compare_gsm8k(loaded, lm_eval_out["cdlm_gsm8k"], args.batch_size)
        print(json.dumps(report["gsm8k"], indent=2), flush=True)
    atomic_write_json(args.output + ".json", report)
    lines = [
        "# cdlm eval harness vs lm-evaluation-harness 0.4.13",
        "",
        f"Model: {args.model} (float32, CPU; machine: {report['machine']}). Command: "
        "`python benchmarks/lm_eval_agreement.py "
        f"--hellaswag-docs {args.hellaswag_docs} --gsm8k-docs {args.gsm8k_docs}`",
        "",
    ]
    if "hellaswag" in report:
        h = report["hellaswag"]
        lines += [
            f"HellaSwag ({h['docs']} docs, lm-eval rendering): max |Δ loglik| {h['max_abs_loglik_diff']:.2e}, "
            f"{100 * h['choices_within_1e-3']:.1f}% of choices within 1e-3, "
            f"same prediction acc {100 * h['same_prediction_acc']:.1f}% / "
            f"acc_norm {100 * h['same_prediction_acc_norm']:.1f}%; "
            f"lm-eval acc {h['lm_eval']['acc']:.4f} / acc_norm {h['lm_eval']['acc_norm']:.4f}, "
            f"cdlm {h['cdlm']['acc']:.4f} / {h['cdlm']['acc_norm']:.4f}; "
            f"examples/s lm-eval {h['lm_eval']['examples_per_second']:.2f}, "
            f"cdlm {h['cdlm']['examples_per_second']:.2f} (x{h['speedup_examples_per_second']:.2f}).",
            "",
        ]
    if "gsm8k" in report:
        g = report["gsm8k"]
        lines += [
            f"GSM8K 5-shot greedy ({g['docs']} problems): same prompt {100 * g['same_prompt']:.0f}%, same response "
            f"{100 * g['same_response']:.0f}%, same strict-match score {100 * g['same_strict_match_score']:.0f}%; "
            f"strict-match / flexible-extract: lm-eval {g['lm_eval']['exact_match,strict-match']:.2f} / "
            f"{g['lm_eval']['exact_match,flexible-extract']:.2f}, cdlm {g['cdlm']['exact_match,strict-match']:.2f} / "
            f"{g['cdlm']['exact_match,flexible-extract']:.2f}; seconds: lm-eval {g['lm_eval']['seconds']:.0f}, "
            f"cdlm {g['cdlm']['seconds']:.0f} (batch {args.batch_size}).",
            "",
        ]
    atomic_write_text(args.output + ".md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
