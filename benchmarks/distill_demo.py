"""DistiLLM-2 on real models, CPU-sized: SmolLM2-135M-Instruct teacher -> a shallow student.

Pipeline: GSM8K-train questions -> (teacher greedy, student sampled) response pairs (resumable) ->
train copies of the same initial student with plain KD (forward KL on teacher responses), CALD and
DistiLLM-2 (linear beta + per-sample alpha curriculum) at the same budget (steps, batch of pairs,
learning rate, seed) -> held-out agreement with the teacher -> save the DistiLLM-2 student and use
it as the contrastive-decoding amateur of its teacher.

The student is the teacher's first ``--student-layers`` decoder layers plus its final norm and
(tied) embeddings, deep-copied into a standalone ``LlamaForCausalLM``: it shares the tokenizer and
starts as the teacher's early exit, far from the teacher's distribution.

    python benchmarks/distill_demo.py                      # defaults used for benchmarks/results/distill_demo.*
    python benchmarks/distill_demo.py --train 32 --eval 8 --steps 4   # smoke run

GSM8K is read from /work/shared/data (benchmark only; the library never reads it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _machine import describe_machine
from transformers import LlamaForCausalLM

from cdlm.alignment.distill.config import DistiLLM2Config
from cdlm.alignment.distill.metrics import distillation_metrics
from cdlm.alignment.distill.pairs import (
    PairGenerationSettings,
    SamplingSettings,
    generate_from_ids,
    generate_pairs,
    mean_logprobs,
    read_prompts,
)
from cdlm.alignment.distill.trainer import DistiLLM2Trainer
from cdlm.models import load_amateur, load_model
from cdlm.models.prompts import eos_token_ids

GSM8K_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")
RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def truncated_student(teacher: LlamaForCausalLM, layers: int) -> LlamaForCausalLM:
    """A standalone Llama with the teacher's first ``layers`` layers (weights deep-copied)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    student = LlamaForCausalLM(config)
    state = {
        key: value.detach().clone()
        for key, value in teacher.state_dict().items()
        if not key.startswith("model.layers.") or int(key.split(".")[2]) < layers
    }
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"student init: missing {missing}, unexpected {unexpected}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.float().eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--train", type=int, default=128, help="training prompts (GSM8K train, first N)")
    parser.add_argument("--eval", type=int, default=32, help="held-out prompts (the next N)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--methods", default="fkl,cald,distillm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--warm-start-steps",
        type=int,
        default=0,
        help="first train the student with plain KD for N steps and re-sample its responses",
    )
    parser.add_argument("--skip-cd", action="store_true", help="do not run the contrastive-decoding check")
    parser.add_argument("--work-dir", default="/tmp/cdlm_distill_demo")
    parser.add_argument("--name", default="distill_demo", help="results file stem in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teacher = load_model(args.teacher, device="cpu", dtype="float32")
    tok = teacher.tokenizer
    student0 = truncated_student(teacher.model, args.student_layers)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    log(
        f"teacher {count(teacher.model) / 1e6:.1f}M params, {teacher.model.config.num_hidden_layers} layers; "
        f"student {count(student0) / 1e6:.1f}M params, {args.student_layers} layers"
    )

    prompts = read_prompts(GSM8K_TRAIN, "question", args.train + args.eval)
    settings = PairGenerationSettings(
        teacher=args.teacher,
        student=f"{args.teacher}[:{args.student_layers}] (deep copy)",
        max_new_tokens=args.max_new_tokens,
        teacher_sampling=SamplingSettings(do_sample=False),
        student_sampling=SamplingSettings(do_sample=True, temperature=1.0),
        seed=0,
    )
    timings = {}
    for split, subset in (("train", prompts[: args.train]), ("eval", prompts[args.train :])):
        began = time.perf_counter()
        rows = generate_pairs(
            subset,
            teacher=teacher.model,
            student=student0,
            tokenizer=tok,
            output=work / f"pairs_{split}_{args.max_new_tokens}.jsonl",
            settings=settings,
            batch_size=8,
            on_batch=lambda done, total, s=split: log(f"pairs[{s}] {done}/{total}"),
        )
        timings[f"generate_{split}_s"] = round(time.perf_counter() - began, 1)
        if split == "train":
            train_rows = rows
        else:
            eval_rows = rows

    pad = tok.pad_token_id
    method_configs = {
        "fkl": dict(loss_type="fkl"),
        "cald": dict(loss_type="cald"),
        "distillm2": dict(
            loss_type="distillm2", beta_schedule="linear", beta_increase=0.5, beta_max=0.75, adaptive_alpha=True
        ),
    }

    def train_method(student, method: str, rows, steps: int):
        config = DistiLLM2Config(
            output_dir=str(work / method),
            max_steps=steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_steps=max(1, steps // 8),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            dataloader_pin_memory=False,
            seed=0,
            chunk_size=128,
            **method_configs[method],
        )
        trainer = DistiLLM2Trainer(
            student, teacher.model, args=config, train_dataset=copy.deepcopy(rows), processing_class=tok
        )
        trainer.train()
        return [e for e in trainer.state.log_history if "loss" in e]

    warm_record = None
    if args.warm_start_steps:
        # The paper distils into an already fine-tuned student. Warm-start with plain KD, then draw
        # fresh student responses from the warm student (on-policy pairs) before the comparison.
        began = time.perf_counter()
        student0 = copy.deepcopy(student0)
        train_method(student0, "fkl", train_rows, args.warm_start_steps)
        sampling = SamplingSettings(do_sample=True, temperature=1.0)
        for rows in (train_rows, eval_rows):
            prompt_ids = [r["prompt_ids"] for r in rows]
            fresh = generate_from_ids(
                student0,
                prompt_ids,
                pad_token_id=pad,
                eos_ids=eos_token_ids(student0, tok),
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                batch_size=8,
                seed=1,
            )
            t_lp = mean_logprobs(teacher.model, prompt_ids, fresh)
            s_lp = mean_logprobs(student0, prompt_ids, fresh)
            c_lp = mean_logprobs(student0, prompt_ids, [r["chosen_ids"] for r in rows])
            for row, ids, a, b, c in zip(rows, fresh, t_lp, s_lp, c_lp):
                row.update(
                    rejected_ids=ids,
                    rejected=tok.decode(ids, skip_special_tokens=True),
                    rejected_teacher_logp=a,
                    rejected_student_logp=b,
                    chosen_student_logp=c,
                )
        timings["warm_start_s"] = round(time.perf_counter() - began, 1)
        warm_record = {
            "method": "fkl",
            "steps": args.warm_start_steps,
            "student_responses": "re-sampled from the warm student (T=1) for train and held-out pairs",
        }
        log(f"warm start done in {timings['warm_start_s']}s")

    metrics = {"initial": distillation_metrics(student0, teacher.model, eval_rows, pad_token_id=pad)}
    log(f"initial: {metrics['initial']}")
    trained = {}
    for method in args.methods.split(","):
        began = time.perf_counter()
        student = copy.deepcopy(student0)
        history = train_method(student, method, train_rows, args.steps)
        timings[f"train_{method}_s"] = round(time.perf_counter() - began, 1)
        metrics[method] = distillation_metrics(student, teacher.model, eval_rows, pad_token_id=pad)
        metrics[method]["log_history"] = history
        trained[method] = student
        log(
            f"{method}: {timings[f'train_{method}_s']}s {dict((k, v) for k, v in metrics[method].items() if k != 'log_history')}"
        )

    # The distilled student as a contrastive-decoding amateur of its teacher.
    best = "distillm2" if "distillm2" in trained else next(iter(trained))
    saved = work / f"student_{best}"
    trained[best].save_pretrained(saved)
    tok.save_pretrained(saved)
    amateur = load_amateur(str(saved), teacher, dtype="float32", device="cpu")
    cd_record: dict = {"amateur": str(saved), "amateur_kind": amateur.kind, "shared_vocab": amateur.vocab_size}
    try:
        if args.skip_cd:
            raise ImportError("--skip-cd")
        from cdlm.decoding.methods import get_method
        from cdlm.decoding.runner import generate

        method = get_method("cd")(teacher.model, tok, amateur=amateur)
        questions = [r["prompt_text"] for r in eval_rows[:2]]
        outputs, stats = generate(
            teacher.model, tok, questions, method, max_new_tokens=args.max_new_tokens, add_special_tokens=False
        )
        greedy, _ = generate(
            teacher.model,
            tok,
            questions,
            get_method("greedy")(teacher.model, tok),
            max_new_tokens=args.max_new_tokens,
            add_special_tokens=False,
        )
        cd_record.update(
            method=method.describe(),
            tokens_per_second=round(stats.tokens_per_second, 2),
            samples=[
                {"question": r["prompt"], "cd": o.text, "greedy": g.text}
                for r, o, g in zip(eval_rows[:2], outputs, greedy)
            ],
        )
    except (ImportError, AttributeError) as error:
        reason = "--skip-cd" if args.skip_cd else f"contrastive decoding is not available ({error})"
        cd_record["cd"] = f"not run: {reason}"
    log(f"CD: {cd_record}")

    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": describe_machine(),
        "teacher": args.teacher,
        "student": settings.student,
        "params_M": {"teacher": round(count(teacher.model) / 1e6, 1), "student": round(count(student0) / 1e6, 1)},
        "data": {
            "source": "GSM8K train questions (first train+eval lines)",
            "train_prompts": len(train_rows),
            "eval_prompts": len(eval_rows),
            "generation": settings.to_dict(),
        },
        "budget": {
            "steps": args.steps,
            "pairs_per_step": args.batch_size,
            "lr": args.lr,
            "schedule": "constant",
            "full fine-tuning": True,
        },
        "methods": {k: v for k, v in method_configs.items() if k in trained},
        "warm_start": warm_record,
        "metrics": metrics,
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 1)},
        "contrastive_decoding": cd_record,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render_markdown(result))
    plot(result, RESULTS / f"{args.name}.png")
    print(render_markdown(result))
    return 0


def render_markdown(result: dict) -> str:
    m = result["metrics"]
    init = m["initial"]
    lines = [
        f"# DistiLLM-2 demo: {result['teacher']} -> {result['student']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; total {result['timings_s']['total']} s.  ",
        f"Data: {result['data']['train_prompts']} train / {result['data']['eval_prompts']} held-out GSM8K questions, "
        f"responses of at most {result['data']['generation']['max_new_tokens']} tokens (teacher greedy, student sampled T=1).  ",
        f"Budget per method: {result['budget']['steps']} steps x {result['budget']['pairs_per_step']} pairs, "
        f"lr {result['budget']['lr']} constant, full fine-tuning, same seed and initial student.",
        "",
    ]
    if result.get("warm_start"):
        w = result["warm_start"]
        lines += [
            f"Warm start: 'initial' is the student after {w['steps']} steps of plain KD ({w['method']}); "
            f"{w['student_responses']}.",
            "",
        ]
    lines += [
        "Held-out, per completion token (KL in nats; lower is better; log-likelihood higher is better):",
        "",
        "| student | KL(teacher‖student) on teacher responses | student log p(teacher response) | KL(student‖teacher) on the stored student responses |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ["initial", *[k for k in m if k != "initial"]]:
        row = m[name]
        ratio = "" if name == "initial" else f" ({row['kl_teacher_responses'] / init['kl_teacher_responses']:.2f}x)"
        lines.append(
            f"| {name} | {row['kl_teacher_responses']:.3f}{ratio} | {row['student_logp_teacher_responses']:.3f} "
            f"| {row['rkl_student_responses']:.3f} |"
        )
    lines += ["", f"Teacher's own log p(teacher response): {init['teacher_logp_teacher_responses']:.3f}.", ""]
    cd = result["contrastive_decoding"]
    lines.append(
        f"Contrastive decoding with the distilled student as amateur: {json.dumps({k: v for k, v in cd.items() if k != 'samples'})}"
    )
    for sample in cd.get("samples", []):
        lines += [
            "",
            f"- Q: {sample['question'][:160]}",
            f"  - CD: {sample['cd'][:300]!r}",
            f"  - greedy: {sample['greedy'][:300]!r}",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    m = result["metrics"]
    names = list(m)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(names, [m[n]["kl_teacher_responses"] for n in names], color="tab:blue")
    axes[0].set_title("held-out KL(teacher||student), teacher responses")
    axes[1].bar(names, [m[n]["student_logp_teacher_responses"] for n in names], color="tab:green")
    axes[1].set_title("held-out student log p(teacher response)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
