"""``cdlm isotropy MODEL``: per-layer mean cosine similarity of token representations within texts.

Tells a user whether contrastive search's assumption (an isotropic representation space, Su & Collier
2022) holds for their model; the measure is defined in :mod:`cdlm.eval_harness.isotropy`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdlm.cli.common import add_model_arguments, load_from_args, progress, read_text_lines


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "isotropy",
        help="per-layer isotropy (mean within-text cosine similarity of token representations)",
        description="Mean cosine similarity of token representations within a text, per layer (Su & Collier 2022): "
        "low values (isotropic) are what contrastive search's degeneration penalty assumes. Texts: shipped "
        "human-written HellaSwag contexts with their gold endings, or --texts-file.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help="one or more models (default: --model)")
    add_model_arguments(parser)
    parser.add_argument("--num-texts", type=int, default=None, help="number of texts (default: 200 shipped texts)")
    parser.add_argument(
        "--texts-file", default=None, help="UTF-8 file, one text per line, instead of the shipped texts"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per text, at most (default 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=None, help="write the JSON report here (and a .md table next to it)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cdlm.eval_harness import isotropy

    models = args.models or [args.model]
    num_texts = isotropy.DEFAULT_TEXTS if args.num_texts is None else args.num_texts
    max_tokens = isotropy.DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    if num_texts < 1:
        raise ValueError(f"--num-texts must be >= 1, got {num_texts}")
    if args.texts_file:
        texts, source = (
            read_text_lines(args.texts_file, "--texts-file", "texts")[:num_texts],
            str(Path(args.texts_file).resolve()),
        )
    else:
        from cdlm.eval_harness.data import load_rows

        rows, _ = load_rows(None, "hellaswag/validation")
        texts, source = isotropy.default_texts(rows, num_texts), isotropy.TEXT_SOURCE
    reports = []
    for model in models:
        args.model = model
        loaded = load_from_args(args)
        progress(f"isotropy of {model}: {len(texts)} texts, <= {max_tokens} tokens each")
        report = isotropy.layer_self_similarity(
            loaded.model,
            loaded.tokenizer,
            texts,
            max_tokens=max_tokens,
            batch_size=args.batch_size,
            model_name=model,
            text_source=source,
        )
        reports.append(report)
        del loaded
        if not args.json:
            print(report.table() + "\n")
        progress(f"{model}: {isotropy.summary_line(report)}")
    payload = json.dumps(isotropy.reports_payload(reports), indent=1)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(payload + "\n")
        output.with_suffix(".md").write_text(isotropy.reports_markdown(reports) + "\n")
        progress(f"wrote {output} and {output.with_suffix('.md')}")
    if args.json:
        print(payload)
    return 0
