"""APO-zero / APO-down: same trainer, another `method`. APO-zero when the chosen replies beat the model's own,
APO-down when even the chosen replies are worse than what the model already says.

    HF_HUB_OFFLINE=1 python examples/train_apo.py        # adapters -> runs/examples/apo_{zero,down}-smollm2

A smoke run of both objectives (5 steps each, 20 pairs): it shows the API and the logged losses, not a gain;
for what 30 steps buy (APO-zero 0.50 -> 0.68, APO-down 0.50 -> 0.62 held-out reward accuracy) see
`benchmarks/results/README.md`, "Preference training", with its command.
"""

from peft import LoraConfig

from cdlm.alignment import PreferenceConfig, PreferenceTrainer, load_default_splits
from cdlm.models import load_model

train, _ = load_default_splits()
for method in ("apo_zero", "apo_down"):
    model, tokenizer = load_model("smollm2-135m-instruct")
    args = PreferenceConfig(
        output_dir=f"runs/examples/{method}-smollm2",
        method=method,
        beta=0.1,
        learning_rate=5e-4,
        max_steps=5,
        per_device_train_batch_size=2,
        max_length=128,
        gradient_checkpointing=False,
        report_to=[],
    )
    PreferenceTrainer(
        model,
        args=args,
        train_dataset=train.select(range(20)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, target_modules="all-linear"),
    ).train()
