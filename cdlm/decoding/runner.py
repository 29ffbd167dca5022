"""Batched text generation with any registered decoding method, with timing.

Shared by ``cdlm generate``, the eval harness and the benchmarks, so every caller tokenises, pads,
stops and counts tokens/s the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList, StopStringCriteria

from cdlm.decoding.methods import DecodingMethod
from cdlm.models.prompts import check_fits_context, eos_token_ids


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]  # generated ids only, without padding or anything after the first EOS
    seconds: float  # wall time of the batch this generation belonged to


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def strip_generated(ids: Sequence[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Generated ids up to the first EOS, without trailing padding (shared by every backend)."""
    tokens: list[int] = []
    for token in ids:
        if token in eos_ids:
            break
        tokens.append(token)
    if pad_id is not None and pad_id not in eos_ids:
        while tokens and tokens[-1] == pad_id:
            tokens.pop()
    return tokens


def apply_stop_strings(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest stop string (lm-eval's ``until`` semantics)."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


SEED_LIMIT = 2**32  # numpy's seed range, which training also uses: one range for every --seed


def check_generation_settings(
    *, max_new_tokens: int, batch_size: int, seed: int | None = None, prompts: int = 0, flags: bool = False
) -> None:
    """Refuse settings :func:`generate` cannot use, before any model is loaded; ``flags``: name CLI flags.

    Batch ``i`` is seeded with ``seed + i * batch_size``, so every such seed must fit ``SEED_LIMIT``.
    """
    names = ("--max-new-tokens", "--batch-size", "--seed") if flags else ("max_new_tokens", "batch_size", "seed")
    for name, value in zip(names, (max_new_tokens, batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be an integer > 0, got {value!r}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT - max(prompts, 1):
            raise ValueError(f"{names[2]} must be an integer in [0, 2**32 - {max(prompts, 1) + 1}], got {seed!r}")


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    method: DecodingMethod,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    contrastive_prompts: Sequence[str] | None = None,
    stop: Sequence[str] = (),
    add_special_tokens: bool = True,
    seed: int | None = None,
    on_batch: Callable[[int, int, GenerationStats], None] | None = None,
) -> tuple[list[Generation], GenerationStats]:
    """Generate a continuation of every prompt; returns the generations and aggregate throughput.

    ``stop`` strings end generation (via ``generate``'s ``stop_strings``) and are cut from the text.
    ``contrastive_prompts`` (same length as ``prompts``) feed methods that contrast two inputs.
    A prompt (or contrastive prompt) that is empty or, with ``max_new_tokens``, longer than the
    model's context raises ``ValueError`` before anything is generated. Batches are always padded on
    the left, whatever ``tokenizer.padding_side`` says.
    """
    check_generation_settings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, prompts=len(prompts))
    if method.needs_contrastive_inputs:
        if contrastive_prompts is None or len(contrastive_prompts) != len(prompts):
            given = 0 if contrastive_prompts is None else len(contrastive_prompts)
            raise ValueError(
                f"method {method.name!r} needs one contrastive prompt per prompt "
                f"({len(prompts)} prompts, {given} contrastive)"
            )
    to_check = {
        "prompt": prompts,
        "contrastive prompt": contrastive_prompts if method.needs_contrastive_inputs else (),
    }
    for what, texts in to_check.items():
        if texts:
            encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
            check_fits_context(model, [len(ids) for ids in encoded], max_new_tokens, what=what)
    eos_ids = set(eos_token_ids(model, tokenizer))
    results: list[Generation] = []
    stats = GenerationStats()
    device = model.device
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        # Left padding whatever the tokenizer's own setting (a saved and reloaded tokenizer pads right).
        batch = tokenizer(
            chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens
        ).to(device)
        contrastive_batch = None
        if contrastive_prompts is not None and method.needs_contrastive_inputs:
            contrastive_chunk = list(contrastive_prompts[start : start + batch_size])
            contrastive_batch = tokenizer(
                contrastive_chunk,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=add_special_tokens,
            ).to(device)
        kwargs = method.generate_kwargs(batch, contrastive_batch)
        if stop:
            # A criterion rather than generate(stop_strings=..., tokenizer=...): transformers 5.x
            # drops `tokenizer` when `custom_generate` is a callable (contrastive search).
            criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop)))
            kwargs["stopping_criteria"] = criteria
        if seed is not None:
            torch.manual_seed(seed + start)
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)  # type: ignore[operator]
        elapsed = time.perf_counter() - began
        sequences = output.sequences if hasattr(output, "sequences") else output
        new = sequences[:, batch["input_ids"].shape[1] :]
        for prompt, row in zip(chunk, new):
            ids = strip_generated(row.tolist(), eos_ids, tokenizer.pad_token_id)
            text = apply_stop_strings(str(tokenizer.decode(ids, skip_special_tokens=True)), stop)
            results.append(Generation(prompt, text, ids, elapsed))
            stats.new_tokens += len(ids)
        stats.seconds += elapsed
        if on_batch is not None:
            on_batch(len(results), len(prompts), stats)
    return results, stats
