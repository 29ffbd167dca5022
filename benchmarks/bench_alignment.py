"""Step-time and peak-memory benchmark: cdlm PreferenceTrainer vs plain TRL DPOTrainer on the same batch.

Not a test: prints the ratios measured in one run and writes ``benchmarks/results/alignment_bench.json``.

* ``cdlm dpo / trl dpo``: PreferenceTrainer(method="dpo") delegates to DPOTrainer's loss, so the goal is <= 1.05.
* ``cdlm sparsepo / cdlm dpo``: SparsePO needs full-vocabulary distributions of policy and reference at every
  completion token (token KL) plus the mask heads; the goal is <= 1.5.

Each configuration runs ``training_step`` (forward + backward) on the identical collated batch; the timings are
interleaved round-robin (so load drifts on a shared machine hit all configurations alike) and the median is
reported. Peak memory: on CUDA ``max_memory_allocated`` per configuration; on CPU the peak RSS of a fresh
subprocess that builds the trainer and runs one step (includes the model and Python, so compare differences).

    HF_HUB_OFFLINE=1 python benchmarks/bench_alignment.py --model smollm2-135m-instruct --repeats 5
    HF_HUB_OFFLINE=1 python benchmarks/bench_alignment.py --model tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import describe_machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("trl_dpo", "cdlm_dpo", "cdlm_sparsepo")


def load(model_name: str):
    from cdlm import testing

    if model_name == "tiny":
        return testing.tiny_llama(seed=0), testing.tiny_tokenizer()
    from cdlm.models import load_model

    loaded = load_model(model_name, device="cuda" if _cuda() else "cpu", dtype="float32")
    return loaded.model, loaded.tokenizer


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build(config_name: str, args: argparse.Namespace):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from cdlm.alignment.preference.config import PreferenceConfig
    from cdlm.alignment.preference.data import load_default_splits
    from cdlm.alignment.preference.trainer import PreferenceTrainer

    train, _ = load_default_splits()
    lengths = [len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in train]
    train = train.select(sorted(range(len(train)), key=lambda i: (lengths[i], i))[: args.batch_size])
    model, tokenizer = load(args.model)
    common = dict(
        output_dir=f"/tmp/cdlm_bench_alignment/{config_name}",
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    if config_name == "trl_dpo":
        trainer = DPOTrainer(
            model, args=DPOConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
    else:
        method = config_name.split("_", 1)[1]
        extra = {"sparsepo_layers": [-1] if args.model == "tiny" else [-8, -4, -1]} if method == "sparsepo" else {}
        trainer = PreferenceTrainer(
            model,
            args=PreferenceConfig(method=method, **common, **extra),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=lora,
        )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop normally
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    return trainer, batch


def one_step(trainer, batch) -> float:
    import torch

    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    trainer.model.zero_grad(set_to_none=True)
    if getattr(trainer, "mask_module", None) is not None:
        trainer.mask_module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def memory_worker(config_name: str, args: argparse.Namespace) -> None:
    import torch

    trainer, batch = build(config_name, args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    one_step(trainer, batch)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda_max_allocated_mib"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "process_peak_rss_mib"
    print(json.dumps({"config": config_name, kind: round(peak, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered model name or 'tiny'")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args)
        return

    import torch

    built = {name: build(name, args) for name in CONFIGS}
    tokens = int(built["trl_dpo"][1]["attention_mask"].sum())
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(args.warmup + args.repeats):
        for name in CONFIGS:
            elapsed = one_step(*built[name])
            if round_index >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model,
        "batch_pairs": args.batch_size,
        "max_length": args.max_length,
        "tokens_in_batch": tokens,
        "repeats": args.repeats,
        "median_step_seconds": {k: round(v, 4) for k, v in median.items()},
        "all_step_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_cdlm_dpo_vs_trl_dpo": round(median["cdlm_dpo"] / median["trl_dpo"], 3),
        "ratio_cdlm_sparsepo_vs_cdlm_dpo": round(median["cdlm_sparsepo"] / median["cdlm_dpo"], 3),
        "machine": (f"CUDA {torch.cuda.get_device_name()}, " if torch.cuda.is_available() else "")
        + describe_machine(),
        "command": " ".join(["python", *sys.argv]),
    }
    if not args.no_memory:
        memory = {}
        for name in CONFIGS:
            command = [
                sys.executable,
                __file__,
                "--memory-worker",
                name,
                "--model",
                args.model,
                "--batch-size",
                str(args.batch_size),
                "--max-length",
                str(args.max_length),
            ]
            output = (
                subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            )
            memory[name] = json.loads(output)
        result["peak_memory"] = memory
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.model != "tiny" else "_tiny"
    (RESULTS / f"alignment_bench{suffix}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
