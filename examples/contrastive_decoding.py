"""Contrastive decoding with plain transformers: an early-exit amateur and a separate one.

    python examples/contrastive_decoding.py

Prints, for two prompts, the greedy continuation and the CD ones (early exit; separate amateur with 4 beams),
40 new tokens each; writes nothing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LogitsProcessorList

from cdlm.decoding.contrastive_decoding import ContrastiveDecodingLogitsProcessor, EarlyExitContrastiveLogitsProcessor
from cdlm.models import EarlyExitAmateur, load_model

model, tokenizer = load_model("smollm2-135m-instruct")
prompts = ["The three most important inventions in history are", "To make a good cup of tea, you"]
batch = tokenizer(prompts, return_tensors="pt", padding=True)  # left padded

with torch.inference_mode():
    greedy = model.generate(**batch, max_new_tokens=40, do_sample=False)

    # 1. Early exit: the amateur is the expert's first 8 layers, read off the expert's own forward pass.
    amateur = EarlyExitAmateur(model, 8)
    with EarlyExitContrastiveLogitsProcessor(amateur, alpha=0.1, beta=0.5) as cd:
        early = model.generate(**batch, max_new_tokens=40, do_sample=False, logits_processor=LogitsProcessorList([cd]))

    # 2. Any separate amateur model with the same tokenizer (here the early-exit shell run on its own,
    #    with its own KV cache); works with beam search too. Pass the prompt's attention mask (it binds
    #    the processor to this batch) and the expert, against which a bare amateur model is checked.
    #    For a separate checkpoint, make_separate_amateur(model, tokenizer, amateur, amateur_tokenizer)
    #    compares the tokenizers themselves.
    cd = ContrastiveDecodingLogitsProcessor(
        amateur.model, formulation="li", attention_mask=batch["attention_mask"], expert=model
    )
    beams = model.generate(**batch, max_new_tokens=40, num_beams=4, logits_processor=LogitsProcessorList([cd]))

start = batch["input_ids"].shape[1]
for i, prompt in enumerate(prompts):
    print(f"### {prompt}")
    for name, output in [("greedy", greedy), ("CD early exit", early), ("CD (Li) beams=4", beams)]:
        print(f"[{name}] {tokenizer.decode(output[i, start:], skip_special_tokens=True)!r}")
