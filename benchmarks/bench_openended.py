"""Open-ended generation benchmark (issue 14): decoding configurations x domains on one model, then scoring.

Two phases, so that generation (slow) and scoring with several judge models can run separately:

    # generate (resumable: each configuration is an `evaluate()` run folder)
    python benchmarks/bench_openended.py generate --model smollm2-135m-instruct --split dev --per-domain 20 \
        --max-new-tokens 64 --configs greedy nucleus cd-li-ee12 ...
    # score every finished configuration with one or more judges, write JSON + markdown + plot
    python benchmarks/bench_openended.py score --model smollm2-135m-instruct --split dev --per-domain 20 \
        --max-new-tokens 64 --judges gemma3-270m smollm2-135m-instruct --name openended_dev_smollm2

Runs live under ``runs/openended/<model>/<split>-<per_domain>-<tokens>/<config>``; results go to
``benchmarks/results/<name>.{json,md,png}``. Each table row is one configuration; the ``human`` row scores
the human continuations of the same prompts. Wall time per configuration is the generation time recorded
by ``evaluate`` (``timing.seconds_total``), with the machine's load average at the start of each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (method, hyperparameters, amateur spec or None)
CONFIGS: dict[str, tuple[str, dict, str | None]] = {
    "greedy": ("greedy", {}, None),
    "nucleus-0.95": ("sample", {"top_p": 0.95}, None),
    "top-k-50": ("sample", {"top_k": 50}, None),
    "typical-0.95": ("sample", {"typical_p": 0.95}, None),
    "typical-0.2": ("sample", {"typical_p": 0.2}, None),
    "cs-0.6-k4": ("cs", {"penalty_alpha": 0.6, "top_k": 4}, None),
    "cs-0.4-k4": ("cs", {"penalty_alpha": 0.4, "top_k": 4}, None),
    "cs-0.6-k8": ("cs", {"penalty_alpha": 0.6, "top_k": 8}, None),
    "dola": ("dola", {}, None),
    "dola-high": ("dola", {"dola_layers": "high"}, None),
}
for layer in (4, 8, 12, 16, 20):
    CONFIGS[f"cd-li-ee{layer}"] = ("cd", {"cd_formulation": "li"}, f"early-exit:{layer}")
    for beta in (0.5, 1.0):
        CONFIGS[f"cd-ol{beta}-ee{layer}"] = (
            "cd",
            {"cd_formulation": "obrien-lewis", "beta": beta},
            f"early-exit:{layer}",
        )
for layer in (4, 8, 12):
    for tau in (0.5, 1.5):
        CONFIGS[f"cd-li-ee{layer}-tau{tau}"] = (
            "cd",
            {"cd_formulation": "li", "amateur_temperature": tau},
            f"early-exit:{layer}",
        )
    for alpha in (0.05, 0.2):
        CONFIGS[f"cd-li-ee{layer}-alpha{alpha}"] = (
            "cd",
            {"cd_formulation": "li", "alpha": alpha},
            f"early-exit:{layer}",
        )


def run_folder(args, config: str) -> Path:
    setting = f"{args.split}-{args.per_domain}-{args.max_new_tokens}" + (
        "" if args.dtype == "float32" else f"-{args.dtype}"
    )
    return ROOT / "runs" / "openended" / args.model / setting / config


def eval_config(args, judge: str = "none"):
    from cdlm.eval_harness.evaluate import EvalConfig

    return EvalConfig(
        task="openended",
        limit=2 * args.per_domain,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        extra={"domain": "all", "split": args.split, "judge": judge},
    )


def generate(args) -> None:
    import torch

    from cdlm.decoding.methods import get_method
    from cdlm.eval_harness.evaluate import evaluate
    from cdlm.models import load_amateur, load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    amateurs: dict = {}
    for name in args.configs:
        method_name, params, amateur_spec = CONFIGS[name]
        try:
            method_class = get_method(method_name)
        except (ImportError, AttributeError, ValueError) as error:
            print(f"[{name}] skipped: method {method_name!r} unavailable ({error})", file=sys.stderr)
            continue
        amateur = None
        if amateur_spec:
            amateur = amateurs.setdefault(amateur_spec, load_amateur(amateur_spec, loaded))
        method = method_class(loaded.model, loaded.tokenizer, amateur=amateur, **params)
        folder = run_folder(args, name)
        load = os.getloadavg()[0]
        evaluate(loaded, method, eval_config(args), folder)
        meta = folder / "bench.json"
        if not meta.exists():
            meta.write_text(json.dumps({"config": name, "load_average_at_start": load, "machine": describe_machine()}))


def _records(folder: Path) -> list[dict]:
    lines = (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["index"])


def score(args) -> None:
    import torch

    from cdlm.eval_harness.data import load_rows
    from cdlm.eval_harness.openended import MAX_NEW_TOKENS, OpenEndedTask, corpus_metrics, human_prefix

    by_id = {row["id"]: row for row in load_rows(None, "openended")[0]}

    torch.set_num_threads(args.threads)
    rows = []
    human_rows = {}
    for name in args.configs or CONFIGS:
        folder = run_folder(args, name)
        if not (folder / "results.json").exists():
            continue
        result = json.loads((folder / "results.json").read_text())
        records = _records(folder)
        for record in records:  # the human text at the run's token budget (older runs stored it whole)
            doc = by_id[record["id"]]
            record["human"] = human_prefix(doc, min(args.max_new_tokens, MAX_NEW_TOKENS[doc["domain"]]))
        row = {
            "config": name,
            "method": result["method"],
            "n": len(records),
            "seconds": result["timing"]["seconds_total"],
            "tokens_per_second": result["timing"]["tokens_per_second"],
            "load_average_at_start": json.loads((folder / "bench.json").read_text())["load_average_at_start"]
            if (folder / "bench.json").exists()
            else None,
        }
        for judge in args.judges:
            started = time.perf_counter()
            settings = {
                "judge": judge,
                "dtype": args.dtype,
                "perplexity": not args.no_perplexity and judge == args.judges[0],
                "coherence": judge == args.judges[0],  # other judges: MAUVE only (does the ranking hinge on it?)
                "samples_sha256": hashlib.sha256((folder / "samples.jsonl").read_bytes()).hexdigest(),
                "task_version": OpenEndedTask.version,  # metric definitions change with it
            }
            stored = folder / f"judged-{judge}.json"  # a finished scoring is reused while nothing it used changed
            earlier = json.loads(stored.read_text()) if stored.exists() else {}
            if earlier.get("settings") == settings:
                metrics = earlier["metrics"]
            else:
                metrics = corpus_metrics(
                    records,
                    judge,
                    with_perplexity=settings["perplexity"],
                    with_coherence=settings["coherence"],
                    judge_dtype=args.dtype,
                )
                stored.write_text(json.dumps({"settings": settings, "metrics": metrics}, default=str) + "\n")
            row[judge] = {k: v for k, v in metrics.items() if "human/" not in k}
            human_rows.setdefault(judge, {k.replace("human/", ""): v for k, v in metrics.items() if "human/" in k})
            print(
                f"[{name}] judged by {judge} in {time.perf_counter() - started:.0f}s: mauve {metrics.get('mauve'):.3f} "
                f"diversity {metrics['diversity']:.3f}",
                file=sys.stderr,
            )
        rows.append(row)
    payload = {
        "model": args.model,
        "split": args.split,
        "per_domain": args.per_domain,
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
        "judges": args.judges,
        "machine": describe_machine(),
        "command": " ".join(sys.argv),
        "rows": rows,
        "human": human_rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(payload))
    plot(payload, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


COLUMNS = ("rep-2", "rep-3", "rep-4", "diversity", "mauve", "coherence", "perplexity", "num_tokens", "stopped_early")


def _cell(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def markdown(payload: dict) -> str:
    """One table per domain and one averaged over the domains: every metric, each judge's MAUVE, wall time."""
    judge = payload["judges"][0]
    lines = [
        f"Open-ended generation, {payload['model']} ({payload.get('dtype', 'float32')}), {payload['split']} split, "
        f"{payload['per_domain']} prompts per domain, new tokens capped at min({payload['max_new_tokens']}, the "
        f"human continuation's length: wikihow 64, books 128); MAUVE, coherence and perplexity judged by {judge}"
        f"; diversity = (1-rep2)(1-rep3)(1-rep4). {payload['machine']}. `{payload['command']}`",
    ]
    for domain in ("all", "wikihow", "books"):
        prefix = "" if domain == "all" else f"{domain}/"
        title = "mean of the two domains" if domain == "all" else domain
        header = ["config", *COLUMNS, *(f"mauve ({j})" for j in payload["judges"][1:])]
        if domain == "all":
            header += ["gen s (both)", "load"]
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in payload["rows"]:
            cells = [
                row["config"],
                *(_cell(row[judge].get(prefix + c)) for c in COLUMNS),
                *(_cell(row[j].get(prefix + "mauve")) for j in payload["judges"][1:]),
            ]
            if domain == "all":
                cells += [f"{row['seconds']:.0f}", _cell(row["load_average_at_start"])]
            lines.append("| " + " | ".join(cells) + " |")
        human = payload["human"].get(judge, {})
        cells = ["human", *(_cell(human.get(prefix + c)) if c != "mauve" else "-" for c in COLUMNS)]
        cells += ["-"] * (len(header) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    judge = payload["judges"][0]
    figure, axes = plt.subplots(figsize=(7, 5))
    for row in payload["rows"]:
        metrics = row[judge]
        axes.scatter(metrics["diversity"], metrics["mauve"])
        axes.annotate(row["config"], (metrics["diversity"], metrics["mauve"]), fontsize=7)
    human = payload["human"].get(judge, {})
    if human:
        axes.axvline(human["diversity"], linestyle="--", color="grey", label="human diversity")
        axes.legend(loc="lower right")
    axes.set_xlabel("diversity = (1-rep2)(1-rep3)(1-rep4)")
    axes.set_ylabel(f"MAUVE (features: {judge})")
    axes.set_title(f"openended {payload['split']}, {payload['model']}, {payload['per_domain']}/domain")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


class ExpertRankedSpecials:
    """The proposed EOS fix, as a wrapper for the experiment: the contrast may keep a special token (EOS)
    only in rows where the expert itself ranks it first; elsewhere it gets -inf. So CD can end a text only
    where greedy decoding on the expert would, and the amateur's low EOS mass can no longer promote EOS."""

    def __init__(self, processor, special_ids):
        self.processor = processor
        self.special_ids = sorted(special_ids)

    def __call__(self, input_ids, scores):
        import torch

        contrasted = self.processor(input_ids, scores)
        top = scores.argmax(dim=-1)
        for special in self.special_ids:
            if special < contrasted.shape[-1]:
                contrasted[:, special] = torch.where(top == special, contrasted[:, special], -torch.inf)
        return contrasted


def eos(args) -> None:
    """CD's first token on zero-shot "Question: ...\nAnswer:" prompts (GSM8K test questions): how often is it
    EOS, what mass do expert and amateur give EOS there, and what the ExpertRankedSpecials fix changes."""
    import torch
    from transformers import LogitsProcessorList

    from cdlm.decoding.contrastive_decoding import contrastive_decoding_processor
    from cdlm.eval_harness.data import load_rows
    from cdlm.models import load_amateur, load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows, _ = load_rows(None, "gsm8k/test")
    prompts = [f"Question: {row['question']}\nAnswer:" for row in rows[: args.per_domain]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    eos_ids = {
        tokenizer.eos_token_id,
        *(
            [model.generation_config.eos_token_id]
            if isinstance(model.generation_config.eos_token_id, int)
            else model.generation_config.eos_token_id or []
        ),
    } - {None}
    eos_id = tokenizer.eos_token_id
    report = {
        "model": args.model,
        "prompts": len(prompts),
        "eos_ids": sorted(eos_ids),
        "machine": describe_machine(),
        "rows": [],
    }
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True)
    expert_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    greedy_first = expert_lp.argmax(-1)
    report["greedy_eos_first"] = float((greedy_first == eos_id).float().mean())
    report["expert_p_eos_mean"] = float(expert_lp[:, eos_id].exp().mean())
    report["expert_eos_rank_median"] = float((expert_lp > expert_lp[:, eos_id : eos_id + 1]).sum(-1).float().median())
    for layer in args.layers:
        amateur = load_amateur(f"early-exit:{layer}", loaded)
        amateur_lp = torch.log_softmax(amateur.logits_from_hidden(out.hidden_states[layer][:, -1]).float(), dim=-1)
        for formulation, beta in (("li", 1.0), ("obrien-lewis", 0.5), ("obrien-lewis", 1.0)):
            row = {
                "amateur": f"early-exit:{layer}",
                "formulation": formulation,
                "beta": beta,
                "amateur_p_eos_mean": float(amateur_lp[:, eos_id].exp().mean()),
            }
            for fixed in (False, True):
                processor = contrastive_decoding_processor(amateur, formulation=formulation, beta=beta)
                if fixed:
                    processor = ExpertRankedSpecials(processor, eos_ids)
                with torch.inference_mode():
                    generated = model.generate(
                        **batch,
                        max_new_tokens=args.max_new_tokens,
                        do_sample=False,
                        logits_processor=LogitsProcessorList([processor]),
                    )
                new = generated[:, batch["input_ids"].shape[1] :]
                key = "fixed" if fixed else "current"
                row[f"{key}_eos_first"] = float((new[:, 0] == eos_id).float().mean())
                row[f"{key}_example"] = tokenizer.decode(new[0], skip_special_tokens=True)[:160]
                if hasattr(processor, "close"):
                    processor.close()
                elif hasattr(processor.processor, "close"):
                    processor.processor.close()
            report["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "openended_eos.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


def plausible(args) -> None:
    """Why deterministic CD stays near greedy: along each run's own continuations, how often the expert's
    plausible set {v : p(v) >= alpha * max p} has one token (then any contrast must pick the expert's argmax),
    over all steps and over the second half of each continuation (where greedy text loops)."""
    import torch

    from cdlm.decoding.contrast import DEFAULT_ALPHA
    from cdlm.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    report = {"model": args.model, "alpha": DEFAULT_ALPHA, "machine": describe_machine(), "rows": {}}
    for name in args.configs:
        singles, late_singles, steps, late_steps, top_mass = 0, 0, 0, 0, 0.0
        for record in _records(run_folder(args, name)):
            context = tokenizer(record["prompt"])["input_ids"]
            target = tokenizer(record["continuation"], add_special_tokens=False)["input_ids"]
            if not target:
                continue
            with torch.inference_mode():
                logits = model(torch.tensor([context + target])).logits[0, len(context) - 1 : -1].float()
            probs = torch.softmax(logits, dim=-1)
            top = probs.max(dim=-1).values
            single = (probs >= DEFAULT_ALPHA * top[:, None]).sum(-1) == 1
            half = len(target) // 2
            singles += int(single.sum())
            late_singles += int(single[half:].sum())
            steps += len(target)
            late_steps += len(target) - half
            top_mass += float(top.sum())
        report["rows"][name] = {
            "steps": steps,
            "one_plausible_token": singles / steps,
            "one_plausible_token_second_half": late_singles / late_steps,
            "mean_top_probability": top_mass / steps,
        }
        print(name, json.dumps(report["rows"][name]), file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"openended_plausible_{args.model}.json").write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("generate", "score", "eos", "plausible"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", default="dev", choices=("dev", "test"))
    parser.add_argument("--per-domain", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16"),
        help="weights of the generating model and the judges (bfloat16: 2-3x faster on CPUs with AVX512-BF16)",
    )
    parser.add_argument("--configs", nargs="*", default=None, help=f"known: {', '.join(CONFIGS)}")
    parser.add_argument("--judges", nargs="+", default=["gemma3-270m"])
    parser.add_argument("--name", default=None, help="results file stem (score phase)")
    parser.add_argument(
        "--no-perplexity", action="store_true", help="score: skip perplexity (slow with Gemma's vocabulary)"
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12], help="early-exit layers (eos phase)")
    args = parser.parse_args()
    unknown = [c for c in args.configs or [] if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if args.phase == "eos":
        eos(args)
    elif args.phase == "plausible":
        plausible(args)
    elif args.phase == "generate":
        if not args.configs:
            parser.error("generate needs --configs")
        generate(args)
    else:
        args.name = args.name or f"openended_{args.split}_{args.model}"
        score(args)


if __name__ == "__main__":
    main()
