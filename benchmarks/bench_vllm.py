"""vLLM backend vs transformers: token agreement and tokens/s for greedy, CD and CID, in one run.

Needs the vLLM venv (scripts/setup_vllm.sh):

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/bench_vllm.py            # writes benchmarks/results/vllm.{json,md}

What it measures on SmolLM2-135M-Instruct (float32, CPU), with the engine serving cdlm's cached
safetensors folder and transformers loading the very same folder:

1. Agreement: greedy, CD (early-exit amateur) and CID on ``--prompts`` chat prompts, both backends,
   batch ``--batch``: generated token ids equal? first divergence? Plus the numerics bound: the
   largest |log p| difference between vLLM's and transformers' expert log-probs (top-20 of the
   first step of each prompt).
2. Throughput: tokens/s of vLLM greedy, vLLM CD, transformers CD (and transformers greedy, vLLM
   CID, transformers CID) at batch 1 and at batch ``--batch``.

Both backends run with the same number of torch threads (vLLM sets 1 for in-process serving unless
OMP_NUM_THREADS is set). Times are wall-clock on whatever machine runs it; say what else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _machine import describe_machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUESTIONS = [
    ("Explain why the sky is blue.", "Explain."),
    ("Write a haiku about autumn leaves.", "Write a haiku."),
    ("What is 12 * 7? Answer step by step.", "Answer step by step."),
    ("Give three tips for staying focused while studying.", "Give three tips."),
    ("Describe the water cycle in two sentences.", "Describe it in two sentences."),
    ("What is the capital of Australia?", "What is the capital?"),
    ("Name a famous painting by Leonardo da Vinci.", "Name a famous painting."),
    ("Why do cats purr?", "Why?"),
    ("Summarise the plot of Romeo and Juliet in one sentence.", "Summarise the plot in one sentence."),
    ("How do vaccines train the immune system?", "How does it work?"),
    ("Translate 'good morning' into French.", "Translate it."),
    ("List the first five prime numbers.", "List five numbers."),
    ("What causes ocean tides?", "What causes it?"),
    ("Suggest a name for a friendly robot.", "Suggest a name."),
    ("Write one sentence about the history of the printing press.", "Write one sentence."),
    ("How many legs does a spider have?", "How many legs?"),
]


def _render(tokenizer, texts):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def expert_logprob_gap(engine, model, tokenizer, prompts: list[str]) -> float:
    """max |log p_vLLM - log p_transformers| over the top-20 tokens of each prompt's first step."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outputs = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=i) for i in ids], SamplingParams(temperature=0.0, max_tokens=1, logprobs=20), use_tqdm=False
    )
    gap = 0.0
    for prompt_ids, output in zip(ids, outputs):
        with torch.inference_mode():
            reference = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
        for token, logprob in output.outputs[0].logprobs[0].items():
            gap = max(gap, abs(logprob.logprob - reference[token].item()))
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="prompts for agreement and the batched run (<= 16)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch1-prompts", type=int, default=2, help="prompts for the batch-1 timing")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--amateur", default="early-exit:8")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm"))
    args = parser.parse_args()

    import torch
    import vllm

    from cdlm.decoding.methods import get_method
    from cdlm.decoding.runner import generate as hf_generate
    from cdlm.decoding.vllm import generate as vllm_generate
    from cdlm.decoding.vllm import load_vllm
    from cdlm.models import load_amateur, load_model

    began = time.perf_counter()
    engine = load_vllm(args.model, max_model_len=1024, max_num_seqs=max(args.batch, 1))
    loaded = load_model(engine.source, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    amateur = load_amateur(args.amateur, loaded)
    threads = torch.get_num_threads()
    print(f"loaded in {time.perf_counter() - began:.1f}s; torch threads {threads}", flush=True)

    pairs = QUESTIONS[: args.prompts]
    prompts = _render(tokenizer, [q for q, _ in pairs])
    contrastive = _render(tokenizer, [c for _, c in pairs])
    methods = {
        "greedy": get_method("greedy")(model, tokenizer),
        "cd": get_method("cd")(model, tokenizer, amateur=amateur),
        "cid": get_method("cid")(model, tokenizer),
    }
    common = dict(max_new_tokens=args.max_new_tokens, add_special_tokens=False)
    record: dict = {
        "model": args.model,
        "served_folder": engine.source,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_threads": threads,
        "machine": describe_machine(),
        "amateur": args.amateur,
        "max_new_tokens": args.max_new_tokens,
        "hyperparameters": {name: m.hyperparameters for name, m in methods.items()},
        "agreement": {},
        "throughput": [],
    }

    record["expert_logprob_max_abs_gap"] = gap = expert_logprob_gap(engine, model, tokenizer, prompts)
    print(f"expert log-prob gap vLLM vs transformers (top-20, first step): {gap:.2e}", flush=True)

    def timed(backend: str, name: str, chosen: list[str], chosen_contrastive: list[str], batch: int):
        method = methods[name]
        kwargs = dict(batch_size=batch, contrastive_prompts=chosen_contrastive if name == "cid" else None, **common)
        if backend == "vllm":
            results, stats = vllm_generate(engine, chosen, method, **kwargs)
        else:
            results, stats = hf_generate(model, tokenizer, chosen, method, **kwargs)
        row = {"backend": backend, "method": name, "batch": batch, "prompts": len(chosen),
               "new_tokens": stats.new_tokens, "seconds": round(stats.seconds, 2),
               "tokens_per_s": round(stats.tokens_per_second, 2)}
        record["throughput"].append(row)
        print(json.dumps(row), flush=True)
        return results

    # 1 + 2a: agreement and the batched throughput, from the same runs.
    for name in ("greedy", "cd", "cid"):
        hf = timed("transformers", name, prompts, contrastive, args.batch)
        vl = timed("vllm", name, prompts, contrastive, args.batch)
        divergences = [_first_divergence(a.token_ids, b.token_ids) for a, b in zip(hf, vl)]
        record["agreement"][name] = {
            "prompts": len(prompts),
            "identical": sum(d is None for d in divergences),
            "first_divergence": divergences,
            "transformers_text": [r.text for r in hf],
            "vllm_text": [r.text for r in vl],
        }
        print(f"{name}: {record['agreement'][name]['identical']}/{len(prompts)} identical", flush=True)

    # 2b: batch 1.
    few, few_contrastive = prompts[: args.batch1_prompts], contrastive[: args.batch1_prompts]
    for backend, name in (("vllm", "greedy"), ("vllm", "cd"), ("transformers", "cd"), ("transformers", "greedy")):
        timed(backend, name, few, few_contrastive, 1)

    def rate(backend, name, batch):
        for row in record["throughput"]:
            if (row["backend"], row["method"], row["batch"]) == (backend, name, batch):
                return row["tokens_per_s"]
        return float("nan")

    record["ratios"] = {
        f"batch{b}": {
            "vllm_cd_over_vllm_greedy": round(rate("vllm", "cd", b) / rate("vllm", "greedy", b), 3),
            "vllm_cd_over_transformers_cd": round(rate("vllm", "cd", b) / rate("transformers", "cd", b), 3),
        }
        for b in (1, args.batch)
    }
    record["total_seconds"] = round(time.perf_counter() - began, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# vLLM backend vs transformers ({args.model}, float32 CPU, vLLM {vllm.__version__})",
        "",
        f"Machine: {record['machine']}; torch threads {threads}. Command: `HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/bench_vllm.py`",
        "",
        f"Expert numerics: max |log p(vLLM) - log p(transformers)| on the top-20 tokens of the first step: {gap:.2e}",
        "",
        "| method | prompts | identical generations | first divergence (token index per prompt, - = identical) |",
        "|---|---|---|---|",
    ]
    for name, a in record["agreement"].items():
        lines.append(f"| {name} | {a['prompts']} | {a['identical']} | {' '.join('-' if d is None else str(d) for d in a['first_divergence'])} |")
    lines += ["", "| backend | method | batch | prompts | new tokens | seconds | tokens/s |", "|---|---|---|---|---|---|---|"]
    for row in record["throughput"]:
        lines.append(f"| {row['backend']} | {row['method']} | {row['batch']} | {row['prompts']} | {row['new_tokens']} | {row['seconds']} | {row['tokens_per_s']} |")
    lines += ["", "Ratios (same run): " + json.dumps(record["ratios"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
