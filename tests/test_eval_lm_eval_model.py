"""lm-eval's own command line with ``--model cdlm`` (cdlm.eval_harness.lm_eval_model) agrees with ``cdlm eval``.

lm-eval lives in its own venv (``.venv-lmeval``, made by ``benchmarks/lm_eval_agreement.py``: torch 2.13,
transformers 5.19, lm-eval[hf] 0.4.13). The test runs lm-eval in whichever interpreter can import it (this
one, or ``.venv-lmeval/bin/python`` with this checkout on ``PYTHONPATH``) and skips when neither can.
On the shipped HellaSwag (lm-eval-rendered) and GSM8K data, with contrastive decoding (early-exit amateur):
per-choice contrastive log-likelihoods and predictions (HellaSwag), prompts, responses and exact-match
scores (GSM8K, 1-shot) must equal what ``cdlm eval`` computes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdlm import testing
from cdlm.decoding.methods import get_method
from cdlm.eval_harness import EvalConfig, evaluate
from cdlm.eval_harness.data import packaged_path, read_jsonl
from cdlm.eval_harness.lm_eval_tasks import write_task_dir
from cdlm.models import EarlyExitAmateur, load_model

ROOT = Path(__file__).resolve().parent.parent
HELLASWAG_DOCS, GSM8K_DOCS, EXIT_LAYER, BETA, MAX_GEN = 6, 3, 2, 0.5, 8


def _lm_eval_python() -> str | None:
    if importlib.util.find_spec("lm_eval") is not None:
        return sys.executable
    venv = ROOT / ".venv-lmeval" / "bin" / "python"
    if venv.exists() and subprocess.run([str(venv), "-c", "import lm_eval"], capture_output=True).returncode == 0:
        return str(venv)
    return None


PYTHON = _lm_eval_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason="lm_eval is not importable here nor in .venv-lmeval")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("lm_eval_model")
    folder = work / "model"
    model = testing.tiny_llama(seed=0)
    model.config.max_position_embeddings = 2048  # rotary positions: room for a 1-shot GSM8K prompt
    model.save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    data = work / "data"
    data.mkdir()
    files = {
        "hellaswag.jsonl": read_jsonl(packaged_path("hellaswag/validation_olmo1000"))[:HELLASWAG_DOCS],
        "gsm8k_test.jsonl": read_jsonl(packaged_path("gsm8k/test"))[:GSM8K_DOCS],
        "gsm8k_train.jsonl": read_jsonl(packaged_path("gsm8k/train")),
    }
    for name, rows in files.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tasks = work / "tasks"
    tasks.mkdir()
    replacements = {
        "__DATA__": data / "hellaswag.jsonl",
        "__TRAIN__": data / "gsm8k_train.jsonl",
        "__TEST__": data / "gsm8k_test.jsonl",
        "num_fewshot: 5": "num_fewshot: 1",
    }
    write_task_dir(tasks, replacements)
    out = work / "lm_eval_out"
    model_args = (
        f"pretrained={folder},method=cd,amateur=early-exit:{EXIT_LAYER},cd_formulation=obrien-lewis,beta={BETA},"
        "dtype=float32"
    )
    command = [
        PYTHON,
        "-m",
        "cdlm.eval_harness.lm_eval_model",
        "--model",
        "cdlm",
        "--model_args",
        model_args,
        "--tasks",
        "cdlm_hellaswag_processed,cdlm_gsm8k",
        "--include_path",
        str(tasks),
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--gen_kwargs",
        f"max_gen_toks={MAX_GEN}",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results_file = next(out.rglob("results_*.json"))
    samples = {
        task: sorted(
            (json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()),
            key=lambda s: s["doc_id"],
        )
        for task in ("cdlm_hellaswag_processed", "cdlm_gsm8k")
    }
    loaded = load_model(str(folder), dtype="float32", device="cpu")
    method = get_method("cd")(
        loaded.model,
        loaded.tokenizer,
        amateur=EarlyExitAmateur(loaded.model, EXIT_LAYER),
        cd_formulation="obrien-lewis",
        beta=BETA,
    )
    ours = {
        "hellaswag": evaluate(
            loaded,
            method,
            EvalConfig(task="hellaswag", data=str(data / "hellaswag.jsonl")),
            work / "cdlm_hs",
            progress=lambda m: None,
        ),
        "gsm8k": evaluate(
            loaded,
            method,
            EvalConfig(
                task="gsm8k",
                data=str(data / "gsm8k_test.jsonl"),
                num_fewshot=1,
                fewshot_data=str(data / "gsm8k_train.jsonl"),
                max_new_tokens=MAX_GEN,
            ),
            work / "cdlm_gsm",
            progress=lambda m: None,
        ),
    }
    records = {
        name: [json.loads(line) for line in Path(result["samples"]).read_text().splitlines()]
        for name, result in ours.items()
    }
    return json.loads(results_file.read_text()), samples, ours, records


def test_lm_eval_cli_with_cdlm_cd_matches_cdlm_eval_on_hellaswag(setup):
    lm_eval_results, samples, ours, records = setup
    theirs = samples["cdlm_hellaswag_processed"]
    assert len(theirs) == len(records["hellaswag"]) == HELLASWAG_DOCS
    for sample, record in zip(theirs, sorted(records["hellaswag"], key=lambda r: r["index"])):
        lm_eval_scores = [float(resp[0][0]) for resp in sample["resps"]]  # logged as strings
        assert lm_eval_scores == pytest.approx(record["scores"], abs=1e-4)  # expert - beta * amateur, per choice
        assert record["scores"] != pytest.approx(record["expert_loglikelihoods"], abs=1e-3)  # the contrast is applied
        assert (sample["acc"], sample["acc_norm"]) == (record["acc"], record["acc_norm"])
    metrics = lm_eval_results["results"]["cdlm_hellaswag_processed"]
    assert metrics["acc,none"] == pytest.approx(ours["hellaswag"]["results"]["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["hellaswag"]["results"]["acc_norm"])


def test_lm_eval_cli_with_cdlm_cd_matches_cdlm_eval_on_gsm8k(setup):
    lm_eval_results, samples, ours, records = setup
    ordered = sorted(records["gsm8k"], key=lambda r: r["index"])
    for filter_name in ("strict-match", "flexible-extract"):  # lm-eval logs each document once per filter
        theirs = [s for s in samples["cdlm_gsm8k"] if s["filter"] == filter_name]
        assert len(theirs) == GSM8K_DOCS
        for sample, record in zip(theirs, ordered):
            arguments = sample["arguments"]
            prompt = arguments["gen_args_0"]["arg_0"] if isinstance(arguments, dict) else arguments[0][0]
            assert prompt == record["prompt"]
            assert sample["resps"][0][0] == record["response"]
            assert sample["exact_match"] == record[f"exact_match,{filter_name}"]
    metrics = lm_eval_results["results"]["cdlm_gsm8k"]
    assert metrics["exact_match,strict-match"] == pytest.approx(ours["gsm8k"]["results"]["exact_match,strict-match"])
    assert metrics["exact_match,flexible-extract"] == pytest.approx(
        ours["gsm8k"]["results"]["exact_match,flexible-extract"]
    )
