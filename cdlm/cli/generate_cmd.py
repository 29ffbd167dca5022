"""``cdlm generate``: continue prompts with one or more decoding methods, side by side, with tokens/s."""

from __future__ import annotations

import argparse
import json

from cdlm.cli.common import (
    add_backend_argument,
    add_method_arguments,
    add_model_arguments,
    build_method,
    check_method_settings,
    check_text_argument,
    generator_from_args,
    load_from_args,
    progress,
    read_text_lines,
    torch_threads,
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
    prompts = [check_text_argument(prompt, "--prompt") for prompt in args.prompt or []]
    if args.prompts_file:
        prompts += read_text_lines(args.prompts_file, "--prompts-file", "prompts")
    return prompts or [prompt for prompt, _ in DEMO_PAIRS]


WARMUP_TOKENS = 4  # a short untimed run per method first: the first call pays one-off costs (allocations, caches)


def _check(args: argparse.Namespace, methods: list[str], prompts: list[str], contrastive: list[str] | None) -> None:
    """Everything that can be refused without a model, refused before one loads."""
    from cdlm.decoding.methods import get_method
    from cdlm.decoding.runner import check_generation_settings

    check_method_settings(args, methods)
    check_generation_settings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        prompts=len(prompts),
        flags=True,
    )
    needs_contrast = [name for name in methods if get_method(name).needs_contrastive_inputs]
    if args.contrastive_prompt is not None and not needs_contrast:
        raise ValueError(
            f"--contrastive-prompt is not used by method(s) {', '.join(methods)} (only --method cid reads it)"
        )
    if needs_contrast and contrastive is None:
        raise ValueError(f"method {needs_contrast[0]!r} needs --contrastive-prompt, one per prompt")
    if contrastive is not None and len(contrastive) != len(prompts):
        raise ValueError(
            f"got {len(contrastive)} --contrastive-prompt for {len(prompts)} prompts; give one per prompt"
        )


def run(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    contrastive = [check_text_argument(text, "--contrastive-prompt") for text in args.contrastive_prompt or []] or None
    if contrastive is None and not (args.prompt or args.prompts_file):
        contrastive = [other for _, other in DEMO_PAIRS]
    methods = args.method or ["greedy"]
    _check(args, methods, prompts, contrastive)

    from cdlm import progress as progress_module
    from cdlm.models.prompts import adds_special_tokens, render_prompts

    loaded = load_from_args(args)
    rendered = render_prompts(loaded.tokenizer, prompts, args.chat)
    rendered_contrastive = render_prompts(loaded.tokenizer, contrastive, args.chat) if contrastive else None
    add_special = adds_special_tokens(loaded.tokenizer, args.chat)
    amateurs: dict = {}
    summary = []
    backend_generate = generator_from_args(args)
    for name in methods:
        method = build_method(name, args, loaded, amateurs)
        options = dict(
            batch_size=args.batch_size,
            contrastive_prompts=rendered_contrastive if method.needs_contrastive_inputs else None,
            add_special_tokens=add_special,
            seed=args.seed,
        )
        warm_contrast = options["contrastive_prompts"]
        backend_generate(  # untimed: the first call of a method pays one-off costs that would skew its tokens/s
            loaded.model,
            loaded.tokenizer,
            rendered[:1],
            method,
            max_new_tokens=min(WARMUP_TOKENS, args.max_new_tokens),
            batch_size=1,
            contrastive_prompts=warm_contrast[:1] if warm_contrast else None,
            add_special_tokens=add_special,
            seed=args.seed,
        )
        with progress_module.track(len(prompts), f"[{name}] generating", unit="prompt") as bar:
            results, stats = backend_generate(
                loaded.model,
                loaded.tokenizer,
                rendered,
                method,
                max_new_tokens=args.max_new_tokens,
                on_batch=lambda done, total, s, bar=bar: bar.update(done - bar.done),
                **options,
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
    threads = torch_threads()
    if args.json:
        progress(f"tokens/s after a {WARMUP_TOKENS}-token warm-up per method; {threads}")
    else:
        print(f"{'method':10} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9}")
        for name, stats in summary:
            print(f"{name:10} {stats.new_tokens:10d} {stats.seconds:8.2f} {stats.tokens_per_second:9.1f}")
        print(f"(tokens/s after a {WARMUP_TOKENS}-token warm-up per method; {threads})")
    return 0
