"""Contrastive input decoding (Yona et al. 2023) with plain transformers.

The output should be likely given the prompt x and unlikely given the contrastive prompt x':
here x' drops the detail that x asks about, so CID leans toward text specific to that detail.

    python examples/contrastive_input_decoding.py

Prints, for two (x, x') pairs, the greedy and the CID answer to x (48 new tokens each); writes nothing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LogitsProcessorList

from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.models import load_model
from cdlm.models.prompts import render_prompts

model, tokenizer = load_model("smollm2-135m-instruct")

pairs = [
    ("Write a short poem about the sea.", "Write a short poem."),
    ("Describe a typical day of a nurse.", "Describe a typical day of a person."),
]
# One user turn of the chat template each; the template already writes the special tokens.
encode = dict(return_tensors="pt", padding=True, add_special_tokens=False)
batch = tokenizer(render_prompts(tokenizer, [x for x, _ in pairs]), **encode)
contrastive = tokenizer(render_prompts(tokenizer, [c for _, c in pairs]), **encode)

with torch.inference_mode():
    greedy = model.generate(**batch, max_new_tokens=48, do_sample=False)
    cid = ContrastiveInputLogitsProcessor(
        model, contrastive["input_ids"], contrastive["attention_mask"], cid_lambda=0.5, alpha=0.1
    )
    contrasted = model.generate(
        **batch, max_new_tokens=48, do_sample=False, logits_processor=LogitsProcessorList([cid])
    )

start = batch["input_ids"].shape[1]
for i, (x, x_c) in enumerate(pairs):
    print(f"### x = {x!r}   x' = {x_c!r}")
    print("[greedy]", tokenizer.decode(greedy[i, start:], skip_special_tokens=True))
    print("[CID]   ", tokenizer.decode(contrasted[i, start:], skip_special_tokens=True))
