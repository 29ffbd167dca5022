"""SparsePO: token-level masks on the reward and KL terms, learned (saved next to the adapter) or activation-based.

    HF_HUB_OFFLINE=1 python examples/train_sparsepo.py   # adapter + masks -> runs/examples/sparsepo-smollm2

A smoke run (10 steps x 2 pairs) that shows the mask settings and where the learned masks are saved, not a gain;
for what 30 steps buy (0.50 -> 0.59 held-out reward accuracy) see `benchmarks/results/README.md`, "Preference
training", with its command.
"""

from peft import LoraConfig

from cdlm.alignment import PreferenceConfig, PreferenceTrainer, load_default_splits, load_sparse_masks
from cdlm.models import load_model

model, tokenizer = load_model("smollm2-135m-instruct")
train, _ = load_default_splits()
args = PreferenceConfig(
    output_dir="runs/examples/sparsepo-smollm2",
    method="sparsepo",
    beta=0.1,
    learning_rate=5e-4,
    max_steps=10,
    sparsepo_mask_type="learned",  # or "activation" with sparsepo_activation="mlp" | "attn" | "residual" | "logits"
    sparsepo_layers=[-8, -4, -1],  # reference layers feeding the masks
    sparsepo_shared_mask=True,  # False: independent reward and KL masks
    sparsepo_mask_l1=0.01,
    sparsepo_mask_weight_decay=0.0,
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
trainer.train()  # logs mask/sparsity, mask/mean, kl/chosen, kl/rejected
trainer.save_model()  # adapter + sparsepo_masks.safetensors
masks = load_sparse_masks(args.output_dir)
print("learned masks loaded back from", args.output_dir)
