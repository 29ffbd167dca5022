"""CPO: reference-free (no reference forward pass), preference term + cpo_alpha * NLL of the chosen replies.

    HF_HUB_OFFLINE=1 python examples/train_cpo.py        # adapter -> runs/examples/cpo-smollm2

Prints the held-out log-ratio accuracy (CPO's implicit reward) before -> after, on 20 pairs. At this budget
(10 steps x 2 pairs) expect no reliable change: the base model already prefers the chosen reply on most pairs
(0.67 on 100 held-out pairs), and 20 pairs give a standard error of about 0.1. 30 steps at lr 1e-3 moved it
0.67 -> 0.69 (`benchmarks/results/README.md`, "Preference training", with its command).
"""

from peft import LoraConfig

from cdlm.alignment import PreferenceConfig, PreferenceTrainer, load_default_splits
from cdlm.models import load_model

model, tokenizer = load_model("smollm2-135m-instruct")
train, test = load_default_splits()
args = PreferenceConfig(
    output_dir="runs/examples/cpo-smollm2",
    method="cpo",
    beta=0.1,
    cpo_alpha=1.0,
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
held_out = test.select(range(20))
before = trainer.preference_metrics(held_out)["logratio_accuracy"]  # CPO's implicit reward
trainer.train()
print(f"held-out log-ratio accuracy: {before:.2f} -> {trainer.preference_metrics(held_out)['logratio_accuracy']:.2f}")
