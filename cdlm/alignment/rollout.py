"""Sampling responses with ``model.generate`` and turning them into masked, right-aligned tensors.

Shared by the offline baseline step (``baselines.py``) and PPO rollouts (``ppo.py``) so that both
sample the same way: prompts rendered with the chat template, left-padded, and each response cut
after its first end-of-sequence token (the EOS itself is kept and counts as a response token, so the
policy is rewarded or penalised for stopping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], use_chat_template: bool) -> list[str]:
    """Wrap each prompt as one user turn with the generation prompt, when asked and a template exists."""
    if not use_chat_template or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's EOS."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


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
) -> Rollout:
    """One response per rendered prompt with ``model.generate`` (call ``torch.manual_seed`` first to reproduce)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left for batched generation (tokenizer.padding_side='left')")
    # Chat templates already contain the BOS text; adding special tokens again would double it.
    add_special = not getattr(tokenizer, "chat_template", None)
    encoded = tokenizer(list(rendered_prompts), return_tensors="pt", padding=True, add_special_tokens=add_special)
    device = next(model.parameters()).device
    prompt_ids = encoded["input_ids"].to(device)
    prompt_mask = encoded["attention_mask"].to(device)
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {"do_sample": False}
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
