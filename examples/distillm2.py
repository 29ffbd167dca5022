"""DistiLLM-2 in a few lines: pairs -> contrastive distillation -> a student that is also a CD amateur.

SmolLM2-135M-Instruct is the teacher and its first 6 layers (deep-copied) the student. For a LoRA student pass
``peft_config=LoraConfig(...)`` to the trainer.

    python examples/distillm2.py        # pairs, run and student -> a temporary folder (printed)

Slow on a small CPU: one run took 345 s on the shared 2-core machine (issue 26), mostly pair generation and
the before/after metrics with two models. It prints KL(teacher || student) on the teacher's responses before ->
after 6 steps (measured on the training pairs
themselves: a fall shows that training works, not that the student generalises) and loads the student back as a
CD amateur.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaForCausalLM

from cdlm.alignment import (
    DistiLLM2Config,
    DistiLLM2Trainer,
    PairGenerationSettings,
    distillation_metrics,
    generate_pairs,
)
from cdlm.models import load_amateur, load_model

work = Path(tempfile.mkdtemp(prefix="cdlm-distillm2-"))
print("writing under", work)
teacher = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
tokenizer = teacher.tokenizer

# A student that shares the teacher's tokenizer: the teacher's first 6 layers in a standalone model.
config = copy.deepcopy(teacher.model.config)
config.num_hidden_layers = 6
student = LlamaForCausalLM(config)
student.load_state_dict(
    {
        k: v.clone()
        for k, v in teacher.model.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < 6
    },
    strict=False,
)

prompts = [
    "What is 12 times 7?",
    "Name three primary colours.",
    "Why do leaves change colour?",
    "Give a synonym of 'quick'.",
]
settings = PairGenerationSettings(teacher="smollm2-135m-instruct", student="smollm2[:6]", max_new_tokens=24)
pairs = generate_pairs(
    prompts,
    teacher=teacher.model,
    student=student,
    tokenizer=tokenizer,
    output=work / "pairs.jsonl",
    settings=settings,
    batch_size=4,
)

args = DistiLLM2Config(
    output_dir=str(work / "run"),
    loss_type="distillm2",
    alpha=0.1,
    beta=0.5,
    beta_schedule="linear",
    adaptive_alpha=True,
    max_steps=6,
    per_device_train_batch_size=4,
    learning_rate=1e-4,
    use_cpu=True,
    bf16=False,
    report_to=[],
    save_strategy="no",
    logging_steps=2,
)
before = distillation_metrics(student, teacher.model, pairs, pad_token_id=tokenizer.pad_token_id)
trainer = DistiLLM2Trainer(student, teacher.model, args=args, train_dataset=pairs, processing_class=tokenizer)
trainer.train()
after = distillation_metrics(student, teacher.model, pairs, pad_token_id=tokenizer.pad_token_id)
print(
    "KL(teacher||student) on teacher responses: "
    f"{before['kl_teacher_responses']:.3f} -> {after['kl_teacher_responses']:.3f}"
)

student.save_pretrained(work / "student")
tokenizer.save_pretrained(work / "student")
amateur = load_amateur(str(work / "student"), teacher, device="cpu", dtype="float32")
print(f"loaded the distilled student as a {amateur.kind} amateur over {amateur.vocab_size} shared ids")
