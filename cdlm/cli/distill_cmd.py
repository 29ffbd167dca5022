"""``cdlm distill``: DistiLLM-2 distillation. ``generate`` builds (teacher, student) response pairs,
``train`` trains the student on them and saves it (loadable as a contrastive-decoding amateur)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from cdlm.cli.common import DTYPES, add_runtime_arguments, progress
from cdlm.cli.training import TrainingCommand


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="DistiLLM-2 contrastive distillation: generate pairs, train a student",
        description="Distil a teacher into a smaller student that shares its tokenizer (DistiLLM-2, Ko et al. 2025).",
    )
    actions = parser.add_subparsers(dest="distill_command", required=True, metavar="ACTION")

    gen = actions.add_parser("generate", help="generate one teacher and one student response per prompt (resumable)")
    _add_models(gen)
    gen.add_argument("--prompts-file", required=True, help="text file (one prompt per line) or JSON lines")
    gen.add_argument(
        "--prompt-field",
        default=None,
        help="JSON-lines field holding the prompt (default: prompt/question/instruction)",
    )
    gen.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    gen.add_argument("--output", required=True, help="pair file to write/append (JSON lines)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--teacher-temperature", type=float, default=0.0, help="0: greedy teacher responses (default)")
    gen.add_argument("--student-temperature", type=float, default=1.0, help="0: greedy student responses")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap prompts in the chat template")
    gen.add_argument(
        "--no-score",
        dest="score",
        action="store_false",
        help="skip the log-prob anchors (adaptive alpha then computes them)",
    )
    gen.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="generate the responses with transformers (default) or vLLM (needs cdlm[vllm]; teacher and "
        "student must be servable references: registered names, GGUF files or folders)",
    )
    gen.set_defaults(func=run_generate)

    train = actions.add_parser(
        "train",
        help="train the student with DistiLLM-2 (or CALD / plain KD) on a pair file",
        description="Train the student on teacher/student response pairs. Settings: DistiLLM2Config defaults < "
        "--config YAML < flags; rerunning into the same --output-dir resumes after checking the settings.",
    )
    _add_models(train)
    TRAIN_COMMAND.add_arguments(train)
    train.set_defaults(func=run_train)


@dataclass
class DistillDataArguments:
    """Which pair files ``cdlm distill train`` reads."""

    pairs: str | None = field(default=None, metadata={"help": "pair file from `cdlm distill generate` (required)"})
    eval_pairs: str | None = field(
        default=None, metadata={"help": "held-out pair file: agreement metrics before/after"}
    )


TRAIN_COMMAND = TrainingCommand(
    name="distill train",
    config_class="cdlm.alignment.distill.config:DistiLLM2Config",
    config_fields=("max_length",),
    data_class=DistillDataArguments,
)


def _add_models(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--teacher", required=True, help="teacher: registered name, folder, GGUF file or hub id")
    group.add_argument(
        "--student", required=True, help="student (shares the teacher's tokenizer): same kinds of reference"
    )
    group.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (default: auto = float32 on CPU)"
    )
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add_runtime_arguments(group)


def _load_pair(args: argparse.Namespace, *, student_dtype: str | None = None):
    from cdlm.models import load_model
    from cdlm.models.amateur import check_same_vocabulary

    teacher = load_model(args.teacher, dtype=args.dtype, device=args.device)
    student = load_model(args.student, dtype=student_dtype or args.dtype, device=args.device)
    check_same_vocabulary(teacher.tokenizer, student.tokenizer, expert_name=args.teacher, amateur_name=args.student)
    progress(
        f"teacher {teacher.source} ({teacher.load_seconds:.1f}s), "
        f"student {student.source} ({student.load_seconds:.1f}s)"
    )
    return teacher, student


def _sampling(temperature: float, top_p: float):
    from cdlm.alignment.distill.pairs import SamplingSettings

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        return SamplingSettings(do_sample=False)
    return SamplingSettings(do_sample=True, temperature=temperature, top_p=top_p)


def run_generate(args: argparse.Namespace) -> int:
    from cdlm.alignment.distill.pairs import PairGenerationSettings, generate_pairs, read_prompts
    from cdlm.progress import Tracker

    prompts = read_prompts(args.prompts_file, args.prompt_field, args.limit)
    settings = PairGenerationSettings(
        teacher=args.teacher,
        student=args.student,
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat,
        teacher_sampling=_sampling(args.teacher_temperature, args.top_p),
        student_sampling=_sampling(args.student_temperature, args.top_p),
        seed=args.seed,
        score=args.score,
        backend=args.backend,
    )
    teacher, student = _load_pair(args)
    generators = {}
    if args.backend == "vllm":
        from cdlm.decoding.vllm import completion_generator, load_vllm

        for role in ("teacher", "student"):
            engine = load_vllm(getattr(args, role), dtype=args.dtype, max_num_seqs=args.batch_size)
            generators[f"{role}_generate"] = completion_generator(engine)
    tracker = Tracker(len(prompts), "pair generation", unit="prompt")

    def on_batch(done: int, total: int) -> None:
        tracker.update(done - tracker.done)

    rows = generate_pairs(
        prompts,
        teacher=teacher.model,
        student=student.model,
        tokenizer=teacher.tokenizer,
        student_tokenizer=student.tokenizer,
        output=args.output,
        settings=settings,
        batch_size=args.batch_size,
        on_batch=on_batch,
        **generators,
    )
    tracker.close()
    print(json.dumps({"pairs": len(rows), "output": str(args.output)}))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from cdlm.alignment.callbacks import TrainingProgress
    from cdlm.alignment.distill.metrics import distillation_metrics
    from cdlm.alignment.distill.pairs import read_pairs
    from cdlm.alignment.distill.trainer import DistiLLM2Trainer
    from cdlm.run_identity import rows_fingerprint

    # Everything cheap is validated before a model is loaded or anything is written.
    settings = TRAIN_COMMAND.resolve(args)
    config, data = settings.config, settings.data
    if not data.pairs:
        raise ValueError("--pairs is required: a pair file from `cdlm distill generate`")
    pairs = read_pairs(data.pairs)
    eval_pairs = read_pairs(data.eval_pairs) if data.eval_pairs else None
    teacher, student = _load_pair(args, student_dtype="float32")
    resume = settings.prepare_output(args, student, data={"pairs": rows_fingerprint(pairs)})
    peft_config = settings.lora.peft_config()
    trainer = DistiLLM2Trainer(
        student.model,
        teacher.model,
        args=config,
        train_dataset=pairs,
        processing_class=student.tokenizer,
        teacher_processing_class=teacher.tokenizer,
        peft_config=peft_config,
    )
    trainer.add_callback(TrainingProgress(f"{config.loss_type} training"))
    report: dict = {"pairs": len(pairs), "loss_type": config.loss_type}
    pad = student.tokenizer.pad_token_id
    if eval_pairs:
        report["before"] = distillation_metrics(
            trainer.model, teacher.model, eval_pairs, pad_token_id=pad, vocab_size=trainer.vocab_size
        )
    result = trainer.train(resume_from_checkpoint=resume)
    report["train_loss"] = result.training_loss
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    if eval_pairs:
        report["after"] = distillation_metrics(
            trained, teacher.model, eval_pairs, pad_token_id=pad, vocab_size=trainer.vocab_size
        )
    if trainer.is_world_process_zero():
        output = Path(config.output_dir)
        trained.save_pretrained(output)
        student.tokenizer.save_pretrained(output)
        (output / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
        progress(f"saved the student to {output} (use it as an amateur: --amateur {output})")
        print(json.dumps(report))
    return 0
