"""``cdlm generate``: continue prompts with one or more decoding methods, side by side, with tokens/s."""

from __future__ import annotations

import argparse
import json

from cdlm.cli.common import (
    add_backend_argument,
    add_method_arguments,
    add_model_arguments,
    build_method,
    generator_from_args,
    load_from_args,
    progress,
    read_text_lines,
)

# (prompt, contrastive prompt) pairs for the demo: contrastive input decoding favours what the
# prompt asks for over what the generic contrastive prompt would also produce.
DEMO_PAIRS = [
    ("Explain in two sentences why the sky is blue.", "Explain in two sentences."),
    ("Write a short poem about the sea.", "Write a short poem."),
    ("What is 17 + 25? Answer step by step.", "Answer step by step."),
]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with one or more decoding methods",
        description="Generate continuations; repeat --method to compare methods on the same prompts.",
    )
    add_model_arguments(parser)
    add_method_arguments(parser, multiple=True)
    parser.add_argument(
        "--prompt", action="append", default=None, help="a prompt (repeatable; default: three demo prompts)"
    )
    parser.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    parser.add_argument(
        "--contrastive-prompt", action="append", default=None, help="contrastive input per prompt (cid)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-chat", dest="chat", action="store_false", help="do not wrap prompts in the chat template"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    add_backend_argument(parser)
    parser.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then --prompts-file lines; the demo prompts only when neither was given."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_text_lines(args.prompts_file, "--prompts-file", "prompts")
    return prompts or [prompt for prompt, _ in DEMO_PAIRS]


def run(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    contrastive = args.contrastive_prompt
    if contrastive is None and not (args.prompt or args.prompts_file):
        contrastive = [other for _, other in DEMO_PAIRS]
    if contrastive is not None and len(contrastive) != len(prompts):
        raise ValueError(
            f"got {len(contrastive)} --contrastive-prompt for {len(prompts)} prompts; give one per prompt"
        )
    from cdlm.decoding.methods import get_method
    from cdlm.models.prompts import adds_special_tokens, render_prompts

    for name in args.method or ["greedy"]:  # refuse bad hyperparameters before loading anything
        method_class = get_method(name)
        method_class.resolve_hyperparameters(
            {p.name: getattr(args, p.name) for p in method_class.params if getattr(args, p.name, None) is not None}
        )
    loaded = load_from_args(args)
    rendered = render_prompts(loaded.tokenizer, prompts, args.chat)
    rendered_contrastive = render_prompts(loaded.tokenizer, contrastive, args.chat) if contrastive else None
    add_special = adds_special_tokens(loaded.tokenizer, args.chat)
    amateurs: dict = {}
    summary = []
    backend_generate = generator_from_args(args)
    for name in args.method or ["greedy"]:
        method = build_method(name, args, loaded, amateurs)
        needs_contrast = method.needs_contrastive_inputs
        if needs_contrast and rendered_contrastive is None:
            raise ValueError(f"method {name!r} needs --contrastive-prompt, one per prompt")
        results, stats = backend_generate(
            loaded.model,
            loaded.tokenizer,
            rendered,
            method,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            contrastive_prompts=rendered_contrastive if needs_contrast else None,
            add_special_tokens=add_special,
            seed=args.seed,
            on_batch=lambda done, total, s, n=name: progress(
                f"[{n}] {done}/{total} prompts, {s.tokens_per_second:.1f} tokens/s"
            ),
        )
        summary.append((name, stats))
        for prompt, result in zip(prompts, results):
            if args.json:
                print(
                    json.dumps(
                        {**method.describe(), "prompt": prompt, "text": result.text, "token_ids": result.token_ids}
                    )
                )
            else:
                print(f"=== {name} | {prompt}\n{result.text.strip()}\n")
    if not args.json:
        print(f"{'method':10} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9}")
        for name, stats in summary:
            print(f"{name:10} {stats.new_tokens:10d} {stats.seconds:8.2f} {stats.tokens_per_second:9.1f}")
    return 0
