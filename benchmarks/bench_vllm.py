"""vLLM backend vs transformers: token agreement, and tokens/s at batch 1 / 16 / 64, interleaved.

Needs the vLLM venv (scripts/setup_vllm.sh):

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/bench_vllm.py      # writes benchmarks/results/vllm.{json,md}

On SmolLM2-135M-Instruct (float32, CPU), one in-process engine serving cdlm's cached safetensors
folder with early exit captured at ``--exit-layer`` (``cdlm.decoding.vllm.early_exit``), and
transformers loading the very same folder:

1. Agreement (batch ``--agreement-prompts``): greedy, CD with the engine-captured early exit, CD
   with the separate batched amateur (the same early-exit model, run by transformers beside vLLM),
   and CID; token ids equal to cdlm's transformers processors? first divergence?
2. Throughput, ``--repeats`` rounds; each round runs every (batch, configuration) once, in an order
   rotated every round, so a burst of load from other jobs hits all configurations alike. Reported:
   median tokens/s, spread ((max - min) / median) and the load average seen by each run.
   Configurations: vLLM greedy, vLLM CD (engine early exit), vLLM CD (separate batched amateur),
   vLLM CID, transformers CD.
3. The compute limit of vLLM CD: ``greedy tokens / (greedy seconds + steps x t_amateur)``, i.e. vLLM
   greedy throughput x t_expert / (t_expert + t_amateur), with ``t_amateur`` one batched amateur
   step at that batch size, measured here on the same prompts (``BatchedAmateur``, decode steps of
   ``batch`` rows after their prefill). Goals (issue 17): CD >= 0.9x its limit and >= 2x
   transformers CD at batch 16 and 64; CID >= 0.45x vLLM greedy.

Both backends run with the same number of torch threads (vLLM sets 1 for in-process serving unless
OMP_NUM_THREADS is set). A spread above 25% is flagged: on a shared machine such ratios say little.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
SPREAD_TOO_WIDE = 0.25
SEPARATE = "early-exit-separate"  # the registered name of the separately run early-exit amateur
AMATEUR_STEP = "amateur step"  # the job that times one batched amateur step


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


def amateur_step_seconds(
    amateur_model, tokenizer, prompts: list[str], steps: int = 8, clock=time.perf_counter
) -> tuple[float, float]:
    """Seconds (of ``clock``) of ``BatchedAmateur``'s prefill of ``prompts`` and its median batched decode step."""
    import torch

    from cdlm.decoding.vllm.params import ContrastParams
    from cdlm.decoding.vllm.state import BatchedAmateur, RequestState

    amateur = BatchedAmateur(amateur_model)
    params = ContrastParams(method="cd", amateur="x")
    states = [RequestState(params, tokenizer(p, add_special_tokens=False)["input_ids"], []) for p in prompts]
    began = clock()
    amateur.logits(states)  # prefill
    prefill = clock() - began
    times = []
    for step in range(steps):
        for state in states:
            state.output_ids.append(1000 + step)
        began = clock()
        amateur.logits(states)
        times.append(clock() - began)
    for state in states:
        amateur.leave(state)
    del torch
    return prefill, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--batch1-prompts", type=int, default=2, help="prompts timed at batch 1")
    parser.add_argument("--agreement-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--exit-layer", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm"))
    parser.add_argument(
        "--from-log", default=None, help="rebuild the results from the printed rows of an interrupted run"
    )
    args = parser.parse_args()
    if args.from_log:
        return rebuild_from_log(args)

    import torch
    import vllm

    from cdlm.decoding.methods import get_method
    from cdlm.decoding.runner import generate as hf_generate
    from cdlm.decoding.vllm import generate as vllm_generate
    from cdlm.decoding.vllm import load_vllm, register_amateur
    from cdlm.models import load_amateur, load_model

    began = time.perf_counter()
    engine = load_vllm(
        args.model, max_model_len=1024, max_num_seqs=max(args.batches), early_exit_layers=[args.exit_layer]
    )
    loaded = load_model(engine.source, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    spec = f"early-exit:{args.exit_layer}"
    amateur = load_amateur(spec, loaded)
    register_amateur(SEPARATE, amateur.model)  # not parsed as early-exit:N, so run beside vLLM (batched)
    threads = torch.get_num_threads()
    print(f"loaded in {time.perf_counter() - began:.1f}s; torch threads {threads}", flush=True)

    questions = [q for q, _ in QUESTIONS]
    contrastive_questions = [c for _, c in QUESTIONS]
    all_prompts = _render(tokenizer, questions)
    all_contrastive = _render(tokenizer, contrastive_questions)
    cd = get_method("cd")(model, tokenizer, amateur=amateur)
    cid = get_method("cid")(model, tokenizer)
    greedy = get_method("greedy")(model, tokenizer)
    common = dict(max_new_tokens=args.max_new_tokens, add_special_tokens=False)
    configurations = {
        "vllm greedy": lambda p, c, b: vllm_generate(engine, p, greedy, batch_size=b, **common),
        "vllm cd (engine early exit)": lambda p, c, b: vllm_generate(engine, p, cd, batch_size=b, **common),
        "vllm cd (separate amateur)": lambda p, c, b: vllm_generate(
            engine, p, "cd", amateur=SEPARATE, hyperparameters=cd.hyperparameters, batch_size=b, **common
        ),
        "vllm cid": lambda p, c, b: vllm_generate(engine, p, cid, batch_size=b, contrastive_prompts=c, **common),
        "transformers cd": lambda p, c, b: hf_generate(model, tokenizer, p, cd, batch_size=b, **common),
    }
    record: dict = {
        "model": args.model,
        "served_folder": engine.source,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_threads": threads,
        "machine": describe_machine(),
        "amateur": spec,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "hyperparameters": {"cd": cd.hyperparameters, "cid": cid.hyperparameters},
        "agreement": {},
        "runs": [],
        "amateur_step_seconds": {},
        "amateur_step_runs": [],
        "summary": {},
    }

    def prompts_for(batch: int):
        count = args.batch1_prompts if batch == 1 else batch
        repeat = -(-count // len(all_prompts))
        return (all_prompts * repeat)[:count], (all_contrastive * repeat)[:count]

    print("RECORD " + json.dumps({k: v for k, v in record.items() if k not in ("runs", "agreement")}), flush=True)

    # 1. Agreement.
    if not args.skip_agreement:
        prompts, contrastive = all_prompts[: args.agreement_prompts], all_contrastive[: args.agreement_prompts]
        batch = len(prompts)
        references = {
            "greedy": hf_generate(model, tokenizer, prompts, greedy, batch_size=batch, **common)[0],
            "cd": hf_generate(model, tokenizer, prompts, cd, batch_size=batch, **common)[0],
            "cid": hf_generate(
                model, tokenizer, prompts, cid, batch_size=batch, contrastive_prompts=contrastive, **common
            )[0],
        }
        for name, reference in (
            ("vllm greedy", "greedy"),
            ("vllm cd (engine early exit)", "cd"),
            ("vllm cd (separate amateur)", "cd"),
            ("vllm cid", "cid"),
        ):
            got = configurations[name](prompts, contrastive, batch)[0]
            divergences = [_first_divergence(a.token_ids, b.token_ids) for a, b in zip(references[reference], got)]
            record["agreement"][name] = {
                "prompts": len(prompts),
                "identical": sum(d is None for d in divergences),
                "first_divergence": divergences,
            }
            print(f"agreement {name}: {record['agreement'][name]['identical']}/{len(prompts)}", flush=True)
        print("RECORD " + json.dumps({"agreement": record["agreement"]}), flush=True)

    # 2. Interleaved rounds: every configuration and the batched amateur's step time (for the compute
    # limit) once per batch size and round.
    jobs = [(batch, name) for batch in args.batches for name in [*configurations, AMATEUR_STEP]]
    for round_index in range(args.repeats):
        shift = round_index * 3 % len(jobs)
        for batch, name in jobs[shift:] + jobs[:shift]:
            prompts, contrastive = prompts_for(batch)
            load = os.getloadavg()[0]
            if name == AMATEUR_STEP:
                prefill, seconds = amateur_step_seconds(amateur.model, tokenizer, prompts)
                cpu_prefill, cpu = amateur_step_seconds(amateur.model, tokenizer, prompts, clock=time.process_time)
                step = {
                    "batch": batch,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "prefill_seconds": prefill,
                    "prefill_cpu_seconds": cpu_prefill,
                    "load": round(load, 2),
                }
                record["amateur_step_runs"].append(step)
                print(json.dumps({"amateur_step": batch, **step}), flush=True)
                continue
            cpu_began = time.process_time()
            results, stats = configurations[name](prompts, contrastive, batch)
            cpu_seconds = time.process_time() - cpu_began
            steps = sum(max(len(r.token_ids) for r in results[i : i + batch]) for i in range(0, len(results), batch))
            row = {
                "round": round_index,
                "batch": batch,
                "configuration": name,
                "prompts": len(prompts),
                "new_tokens": stats.new_tokens,
                "steps": steps,
                "seconds": round(stats.seconds, 3),
                "tokens_per_s": round(stats.tokens_per_second, 2),
                "cpu_seconds": round(cpu_seconds, 3),
                "tokens_per_cpu_s": round(stats.new_tokens / cpu_seconds, 2),
                "load": round(load, 2),
            }
            record["runs"].append(row)
            print(json.dumps(row), flush=True)

    # 3. Medians, spreads, ratios, goals.
    summarize(record, args.batches, list(configurations))
    record["total_seconds"] = round(time.perf_counter() - began, 1)
    record["load_at_end"] = round(os.getloadavg()[0], 2)
    write(record, args)


def summarize(record: dict, batches: list[int], names: list[str]) -> None:
    """Medians, spreads, the CD compute limit and the goal ratios per batch size, into ``record["summary"]``."""

    def runs(batch, name):
        return [r for r in record["runs"] if r["batch"] == batch and r["configuration"] == name]

    for batch in batches:
        steps = [r["seconds"] for r in record["amateur_step_runs"] if r["batch"] == batch]
        if steps:
            record["amateur_step_seconds"][str(batch)] = statistics.median(steps)
        cpu_steps = [
            r["cpu_seconds"] for r in record["amateur_step_runs"] if r["batch"] == batch and "cpu_seconds" in r
        ]
        summary: dict = {}
        for name in names:
            rates = [r["tokens_per_s"] for r in runs(batch, name)]
            if not rates:
                continue
            median = statistics.median(rates)
            cpu_rates = [r["tokens_per_cpu_s"] for r in runs(batch, name) if "tokens_per_cpu_s" in r]
            summary[name] = {
                "median_tokens_per_s": round(median, 2),
                "spread": round((max(rates) - min(rates)) / median, 3),
                "median_tokens_per_cpu_s": round(statistics.median(cpu_rates), 2) if cpu_rates else None,
                "loads": [r["load"] for r in runs(batch, name)],
            }
        if len(summary) < len(names):
            continue  # an interrupted run: this batch size is incomplete
        t_amateur = record["amateur_step_seconds"][str(batch)]
        limits = [r["new_tokens"] / (r["seconds"] + r["steps"] * t_amateur) for r in runs(batch, "vllm greedy")]
        limit = statistics.median(limits)

        def ratio(a: str, b: str) -> float:
            return round(summary[a]["median_tokens_per_s"] / summary[b]["median_tokens_per_s"], 3)

        summary["ratios"] = {
            "cd_separate_over_its_compute_limit": round(
                summary["vllm cd (separate amateur)"]["median_tokens_per_s"] / limit, 3
            ),
            "cd_engine_over_vllm_greedy": ratio("vllm cd (engine early exit)", "vllm greedy"),
            "cd_separate_over_transformers_cd": ratio("vllm cd (separate amateur)", "transformers cd"),
            "cd_engine_over_transformers_cd": ratio("vllm cd (engine early exit)", "transformers cd"),
            "cid_over_vllm_greedy": ratio("vllm cid", "vllm greedy"),
        }
        summary["compute_limit_tokens_per_s"] = round(limit, 2)
        if cpu_steps and all(summary[n]["median_tokens_per_cpu_s"] for n in names):
            # The same ratios on CPU time (this process's threads, vLLM's engine included: it runs in
            # process): far less sensitive to other jobs than wall-clock time on a shared machine.
            cpu_limits = [
                r["new_tokens"] / (r["cpu_seconds"] + r["steps"] * statistics.median(cpu_steps))
                for r in runs(batch, "vllm greedy")
            ]

            def cpu_ratio(a: str, b: str) -> float:
                return round(summary[a]["median_tokens_per_cpu_s"] / summary[b]["median_tokens_per_cpu_s"], 3)

            prefills = [
                r["prefill_cpu_seconds"]
                for r in record["amateur_step_runs"]
                if r["batch"] == batch and "prefill_cpu_seconds" in r
            ]
            if prefills:  # the amateur also reads every prompt once per generate() call (prompts / batch calls)
                calls = -(-runs(batch, "vllm greedy")[0]["prompts"] // batch)
                with_prefill = [
                    r["new_tokens"]
                    / (
                        r["cpu_seconds"]
                        + calls * statistics.median(prefills)
                        + r["steps"] * statistics.median(cpu_steps)
                    )
                    for r in runs(batch, "vllm greedy")
                ]
                summary["cpu_limit_with_prefill_ratio"] = round(
                    summary["vllm cd (separate amateur)"]["median_tokens_per_cpu_s"] / statistics.median(with_prefill),
                    3,
                )
            summary["cpu_ratios"] = {
                "cd_separate_over_its_compute_limit": round(
                    summary["vllm cd (separate amateur)"]["median_tokens_per_cpu_s"] / statistics.median(cpu_limits), 3
                ),
                "cd_engine_over_vllm_greedy": cpu_ratio("vllm cd (engine early exit)", "vllm greedy"),
                "cd_separate_over_transformers_cd": cpu_ratio("vllm cd (separate amateur)", "transformers cd"),
                "cd_engine_over_transformers_cd": cpu_ratio("vllm cd (engine early exit)", "transformers cd"),
                "cid_over_vllm_greedy": cpu_ratio("vllm cid", "vllm greedy"),
            }
        summary["too_wide"] = sorted(n for n in names if summary[n]["spread"] > SPREAD_TOO_WIDE)
        record["summary"][str(batch)] = summary


def rebuild_from_log(args) -> None:
    """Results from the JSON rows a (possibly interrupted) run printed: its completed rounds only."""
    record: dict = {"runs": [], "amateur_step_runs": [], "amateur_step_seconds": {}, "summary": {}, "agreement": {}}
    for line in Path(args.from_log).read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "configuration" in row:
                record["runs"].append(row)
            elif "amateur_step" in row:
                record["amateur_step_runs"].append({**row, "batch": row["amateur_step"]})
        elif line.startswith("RECORD "):
            record.update(json.loads(line[len("RECORD ") :]))
    names = list(dict.fromkeys(r["configuration"] for r in record["runs"]))
    summarize(record, args.batches, names)
    record["load_at_end"] = round(os.getloadavg()[0], 2)
    write(record, args)


def write(record: dict, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    command = "HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/bench_vllm.py"
    lines = [
        f"# vLLM backend vs transformers ({record['model']}, float32 CPU, vLLM {record['vllm']})",
        "",
        f"Machine: {record['machine']}; load average {record['load_at_end']} at the end. Command: `{command}` "
        f"({record['repeats']} interleaved rounds, {record['max_new_tokens']} new tokens, "
        f"amateur {record['amateur']}).",
        "",
    ]
    if record["agreement"]:
        lines += [
            "| configuration | prompts | identical to transformers | first divergence (- = identical) |",
            "|---|---|---|---|",
        ]
        for name, a in record["agreement"].items():
            divergence = " ".join("-" if d is None else str(d) for d in a["first_divergence"])
            lines.append(f"| {name} | {a['prompts']} | {a['identical']} | {divergence} |")
        lines.append("")
    lines += [
        "| batch | configuration | median tokens/s | spread | median tokens per CPU-second | load averages |",
        "|---|---|---|---|---|---|",
    ]
    for batch, summary in record["summary"].items():
        for name, row in summary.items():
            if isinstance(row, dict) and "median_tokens_per_s" in row:
                wide = " (too wide)" if name in summary["too_wide"] else ""
                lines.append(
                    f"| {batch} | {name} | {row['median_tokens_per_s']} | {row['spread']:.0%}{wide} | "
                    f"{row.get('median_tokens_per_cpu_s')} | {', '.join(str(x) for x in row['loads'])} |"
                )
    lines += [
        "",
        "| batch | t_amateur (s/step) | CD compute limit (tok/s) | CD sep / limit | CD sep / tf CD | "
        "CD engine / tf CD | CD engine / greedy | CID / greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, summary in record["summary"].items():
        for clock, key in (("wall", "ratios"), ("CPU", "cpu_ratios")):
            if key not in summary:
                continue
            r = summary[key]
            t_amateur = f"{record['amateur_step_seconds'][batch]:.4f}" if clock == "wall" else "(CPU)"
            limit = summary["compute_limit_tokens_per_s"] if clock == "wall" else "-"
            lines.append(
                f"| {batch} ({clock}) | {t_amateur} | {limit} | "
                f"{r['cd_separate_over_its_compute_limit']} | {r['cd_separate_over_transformers_cd']} | "
                f"{r['cd_engine_over_transformers_cd']} | {r['cd_engine_over_vllm_greedy']} | "
                f"{r['cid_over_vllm_greedy']} |"
            )
    with_prefill = {
        b: v["cpu_limit_with_prefill_ratio"]
        for b, v in record["summary"].items()
        if "cpu_limit_with_prefill_ratio" in v
    }
    if with_prefill:
        lines += [
            "",
            "CD sep / its CPU compute limit counting the amateur's prefill too, per batch: "
            + json.dumps(with_prefill),
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
