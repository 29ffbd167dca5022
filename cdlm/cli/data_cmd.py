"""``cdlm data``: inspect and curate preference data before training on it.

``cdlm data ches`` scores every pair with CHES (:mod:`cdlm.alignment.preference.ches`), the score Razin et al.
(ICLR 2025) show predicts which pairs make DPO-like training lower the chosen reply's likelihood, and with
``--drop-top`` writes the dataset without the highest-scoring pairs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cdlm.cli.common import add_model_arguments, load_from_args, progress

SCORES = ("ches", "ches_normalized")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect and curate preference data (CHES scores)")
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    ches = actions.add_parser(
        "ches",
        help="score preference pairs by CHES (likelihood displacement risk); optionally drop the top fraction",
        description="Writes OUTPUT_DIR/samples.jsonl (one record per pair, appended as batches finish; rerunning "
        "continues), run.json (model/data/settings signature), ches_summary.json (quantiles, histogram), "
        "ches_histogram.png, and with --drop-top OUTPUT_DIR/filtered.jsonl.",
    )
    ches.add_argument(
        "--dataset",
        default=None,
        help="preference .jsonl[.gz]/.json/.csv/.parquet file or hub id (default: the shipped HH-RLHF harmless set)",
    )
    ches.add_argument(
        "--split", default="train", help="split / `split` column value to score (default: train; 'all' = every row)"
    )
    ches.add_argument("--output-dir", required=True, help="where scores, histogram and the filtered dataset go")
    ches.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="cut prompt + reply to this many tokens, as training would (default: no cut)",
    )
    ches.add_argument("--batch-size", type=int, default=8, help="pairs per forward batch (default: 8)")
    ches.add_argument(
        "--drop-top",
        type=float,
        default=None,
        metavar="FRACTION",
        help="write OUTPUT_DIR/filtered.jsonl without this fraction of highest-scoring pairs",
    )
    ches.add_argument("--score", choices=SCORES, default="ches", help="score ranked by --drop-top (default: ches)")
    ches.add_argument("--bins", type=int, default=30, help="histogram bins (default: 30)")
    ches.add_argument("--overwrite", action="store_true", help="discard scores already in --output-dir")
    add_model_arguments(ches)
    ches.set_defaults(func=run_ches)


def _validate(args: argparse.Namespace) -> None:
    if args.drop_top is not None and not 0 <= args.drop_top < 1:
        raise ValueError(f"--drop-top must be a fraction in [0, 1), got {args.drop_top}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    if args.bins < 1:
        raise ValueError(f"--bins must be >= 1, got {args.bins}")


def summarize(records: list[dict], bins: int) -> dict:
    """Counts, quantiles and histograms of both scores."""
    import torch

    from cdlm.alignment.preference.ches import histogram

    summary: dict = {"pairs": len(records), "skipped": sum(1 for r in records if "skipped" in r)}
    for name in SCORES:
        values = torch.tensor([r[name] for r in records if not math.isnan(r[name])], dtype=torch.float64)
        if values.numel() == 0:
            continue
        quantiles = torch.quantile(values, torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64))
        summary[name] = {
            "mean": float(values.mean()),
            "quantiles": dict(zip(("min", "p10", "p25", "median", "p75", "p90", "max"), quantiles.tolist())),
            "histogram": histogram(values.tolist(), bins=bins),
        }
    return summary


def _plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [name for name in SCORES if name in summary]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        hist = summary[name]["histogram"]
        edges, counts = hist["edges"], hist["counts"]
        axis.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
        axis.set_xlabel(name)
        axis.set_ylabel("pairs")
    figure.suptitle(f"CHES over {summary['pairs']} pairs (higher = more likelihood displacement)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def run_ches(args: argparse.Namespace) -> int:
    _validate(args)
    from cdlm.alignment.preference.ches import CHESSettings, score_pairs, top_fraction
    from cdlm.alignment.preference.data import load_preference_dataset
    from cdlm.progress import Tracker
    from cdlm.runs import atomic_write_json, atomic_write_text
    from cdlm.textio import dumps_line

    dataset = load_preference_dataset(args.dataset, split=None if args.split == "all" else args.split)
    if len(dataset) == 0:
        raise ValueError("the preference dataset has no rows")
    settings = CHESSettings(max_length=args.max_length)
    loaded = load_from_args(args)
    output = Path(args.output_dir)
    tracker = Tracker(len(dataset), "CHES scoring", unit="pair")

    def report(done: int, total: int) -> None:
        tracker.update(done - tracker.done)

    records = score_pairs(
        loaded.model,
        loaded.tokenizer,
        dataset,
        settings=settings,
        batch_size=args.batch_size,
        output_dir=output,
        overwrite=args.overwrite,
        progress=report,
    )
    tracker.close()
    summary = summarize(records, args.bins)
    summary.update(
        model=args.model,
        dataset=args.dataset or "shipped HH-RLHF harmless",
        split=args.split,
        max_length=args.max_length,
    )
    if args.drop_top is not None:
        dropped = set(top_fraction(records, args.drop_top, score=args.score))
        kept = [row for index, row in enumerate(dataset) if index not in dropped]
        atomic_write_text(output / "filtered.jsonl", "".join(dumps_line(row) + "\n" for row in kept))
        summary["filtered"] = {
            "file": "filtered.jsonl",
            "score": args.score,
            "drop_top": args.drop_top,
            "dropped": len(dropped),
            "kept": len(kept),
            "dropped_indices": sorted(dropped),
        }
        progress(
            f"wrote {output / 'filtered.jsonl'}: {len(kept)} pairs kept, {len(dropped)} highest-{args.score} dropped"
        )
    atomic_write_json(output / "ches_summary.json", summary)
    plotted = _plot(summary, output / "ches_histogram.png")
    for name in SCORES:
        if name in summary:
            q = summary[name]["quantiles"]
            print(
                f"{name}: median {q['median']:.4g}, p90 {q['p90']:.4g}, max {q['max']:.4g} "
                f"over {summary['pairs']} pairs"
            )
    print(
        f"scores: {output / 'samples.jsonl'}; summary: {output / 'ches_summary.json'}"
        + (f"; histogram: {output / 'ches_histogram.png'}" if plotted else "")
    )
    return 0
