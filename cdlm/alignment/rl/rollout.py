"""Sampling responses with ``model.generate`` and turning them into masked, right-aligned tensors.

Shared by the offline baseline step (``baselines.py``) and PPO rollouts (``trainer.py``) so that both
sample the same way: prompts rendered with the chat template, left-padded, and each response cut
after its first end-of-sequence token (the EOS itself is kept and counts as a response token, so the
policy is rewarded or penalised for stopping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cdlm.models.prompts import adds_special_tokens, eos_token_ids, render_prompts

__all__ = [
    "Rollout",
    "RowSeededSampling",
    "completion_text",
    "eos_token_ids",
    "prompt_text",
    "render_prompts",
    "response_mask",
    "sample_responses",
]


def prompt_text(prompt: Any) -> str:
    """The user text of a prompt: a plain string, or the last user turn of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[-1], dict):
        users = [message for message in prompt if message.get("role") == "user"]
        return str((users or list(prompt))[-1].get("content", ""))
    raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def completion_text(completion: Any) -> str:
    """The text of a completion: a plain string, or the content of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[0], dict):
        return "".join(str(message.get("content", "")) for message in completion)
    raise ValueError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def response_mask(response_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 for the tokens up to and including the first EOS of each row, 0 afterwards."""
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_ids), device=response_ids.device))
    # Number of EOS tokens strictly before each position: 0 means still inside the response.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


@dataclass
class Rollout:
    """Sampled responses for a batch of prompts, ready for scoring and PPO."""

    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R), pad after the first EOS
    response_mask: torch.Tensor  # (B, R)
    texts: list[str]  # decoded responses without special tokens
    ended: torch.Tensor  # (B,) bool: the response contains an EOS

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


class RowSeededSampling(LogitsProcessor):
    """Sampling with one RNG per row, for greedy ``generate``: temperature, top-k, top-p, then Gumbel noise.

    ``argmax(z + g)`` with ``g = -log(E)``, ``E ~ Exp(1)`` i.i.d. is an exact sample from ``softmax(z)`` (the
    Gumbel-max trick). Drawing row ``i``'s noise from its own generator seeded with ``seeds[i]`` makes the
    sampled tokens a function of the row alone, so data-parallel rollouts (each process sampling its share
    of the prompts) give the responses one process gives for the whole batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(
                f"RowSeededSampling has {len(self.generators)} seeds for a batch of {scores.shape[0]} rows"
            )
        scores = self.warpers(input_ids, scores.float())
        exponential = torch.stack([torch.empty(scores.shape[1]).exponential_(generator=g) for g in self.generators])
        return scores - exponential.log().to(scores.device)


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rendered_prompts: Sequence[str],
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    row_seeds: Sequence[int] | None = None,
) -> Rollout:
    """One response per rendered prompt with ``model.generate``.

    Sampling draws from the global torch RNG (call ``torch.manual_seed`` first to reproduce), or, with
    ``row_seeds`` (one per prompt), from one generator per row (:class:`RowSeededSampling`), so a row's
    response does not depend on which other prompts share its batch or process.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left for batched generation (tokenizer.padding_side='left')")
    # Chat templates already contain the BOS text; adding special tokens again would double it.
    add_special = adds_special_tokens(tokenizer)
    encoded = tokenizer(list(rendered_prompts), return_tensors="pt", padding=True, add_special_tokens=add_special)
    device = next(model.parameters()).device
    prompt_ids = encoded["input_ids"].to(device)
    prompt_mask = encoded["attention_mask"].to(device)
    eos_ids = eos_token_ids(model, tokenizer)
    if not do_sample:
        sampling: dict[str, Any] = {"do_sample": False}
    elif row_seeds is not None:
        if len(row_seeds) != len(rendered_prompts):
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(rendered_prompts)} prompts")
        # generate's own sampling would draw from one shared RNG; pick argmax(warped logits + Gumbel noise) instead.
        sampling = {
            "do_sample": False,
            "temperature": None,
            "top_k": None,
            "top_p": None,
            "logits_processor": LogitsProcessorList([RowSeededSampling(row_seeds, temperature, top_k, top_p)]),
        }
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            **sampling,
        )
    finally:
        model.train(was_training)
    response_ids = output[:, prompt_ids.shape[1] :]
    if response_ids.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    mask = response_mask(response_ids, eos_ids)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    ended = (torch.isin(response_ids, torch.tensor(eos_ids, device=device)) & mask.bool()).any(dim=1)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, texts, ended)
