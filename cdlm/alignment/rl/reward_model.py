"""Training a learned reward model (sequence classification, one output) with TRL's ``RewardTrainer``.

The trained folder loads back as a reward function with ``load_reward("model:PATH")``.
"""

from __future__ import annotations

import os
from typing import Any


def train_reward_model(
    model: str | os.PathLike,
    tokenizer,
    train_dataset,
    output_dir: str | os.PathLike,
    *,
    lora_r: int = 8,
    lora_alpha: int = 16,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 4,
    max_length: int = 512,
    max_steps: int = -1,
    seed: int = 0,
    **config_kwargs: Any,
):
    """Train a LoRA reward model on preference pairs with TRL's ``RewardTrainer`` and save it to ``output_dir``.

    ``model`` is a causal-LM folder or hub id; TRL loads it as ``AutoModelForSequenceClassification``
    (a fresh one-output score head on the LM) and wraps it with the LoRA config (``task_type="SEQ_CLS"``
    keeps the score head trainable). ``train_dataset`` has ``chosen``/``rejected`` columns (optionally
    ``prompt``), implicit or conversational, as TRL expects. The settings suit CPUs: no bf16, no
    gradient checkpointing, no loggers. Returns the trainer (its ``model`` is the trained reward model).
    """
    from peft import LoraConfig
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from cdlm.alignment.parallel import check_launch, is_cpu_launch

    if train_dataset is None or len(train_dataset) == 0:
        raise ValueError("train_reward_model needs a non-empty preference dataset with 'chosen' and 'rejected'")
    missing = {"chosen", "rejected"} - set(train_dataset.column_names)
    if missing:
        raise ValueError(f"preference dataset is missing column(s) {sorted(missing)}")
    if is_cpu_launch():  # torchrun on CPUs: gloo DDP, not independent copies (see cdlm.alignment.parallel)
        config_kwargs["use_cpu"] = True
    args = RewardConfig(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        max_length=max_length,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=seed,
        **config_kwargs,
    )
    # RewardTrainer builds the score head and the LoRA weights before Trainer seeds anything: seed them here,
    # so that runs (and every data-parallel process) start from the same weights.
    set_seed(seed)
    peft_config = LoraConfig(
        task_type="SEQ_CLS", r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules="all-linear"
    )
    trainer = RewardTrainer(
        model=str(model), args=args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
    )
    check_launch(trainer.accelerator)
    trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return trainer
