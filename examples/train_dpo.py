"""DPO with a LoRA adapter on SmolLM2-135M-Instruct and the shipped HH-RLHF harmless pairs (offline, CPU-friendly).

HF_HUB_OFFLINE=1 python examples/train_dpo.py
"""

from peft import LoraConfig

from cdlm.alignment import PreferenceConfig, PreferenceTrainer, load_default_splits
from cdlm.models import load_model

model, tokenizer = load_model("smollm2-135m-instruct")
train, test = load_default_splits()
args = PreferenceConfig(
    output_dir="dpo-smollm2",
    method="dpo",
    beta=0.1,
    learning_rate=5e-4,
    max_steps=10,
    per_device_train_batch_size=2,
    max_length=128,
    gradient_checkpointing=False,
    report_to=[],
)
trainer = PreferenceTrainer(
    model,
    args=args,
    train_dataset=train.select(range(40)),
    processing_class=tokenizer,
    peft_config=LoraConfig(r=16, target_modules="all-linear"),
)
trainer.train()
print(trainer.preference_metrics(test.select(range(20))))
trainer.save_model()  # the LoRA adapter
