"""Model-side rules for prompts and responses, shared by decoding, eval and alignment.

* :func:`render_prompts`: each prompt as one user turn of the tokenizer's chat template, with the
  generation prompt (or unchanged without a template / when asked not to);
* :func:`adds_special_tokens`: whether tokenising rendered text should add special tokens (chat
  templates already write the BOS text; adding it again would double it);
* :func:`eos_token_ids`: every id that ends a response (generation config and tokenizer);
* :func:`context_length` and :func:`check_fits_context`: refuse prompts the model cannot attend to
  instead of letting positions run past what it was trained on.
"""

from __future__ import annotations

from typing import Any, Sequence


def uses_chat_template(tokenizer: Any, use_chat_template: bool = True) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def render_prompts(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool = True) -> list[str]:
    """Wrap each prompt as one user turn with the generation prompt, when asked and a template exists."""
    if not uses_chat_template(tokenizer, use_chat_template):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def adds_special_tokens(tokenizer: Any, use_chat_template: bool = True) -> bool:
    """``add_special_tokens`` for text from :func:`render_prompts`: off when the template wrote them."""
    return not uses_chat_template(tokenizer, use_chat_template)


def eos_token_ids(source: Any, tokenizer: Any = None) -> list[int]:
    """Every id that ends a response, sorted: the generation config's EOS id(s) and the tokenizer's EOS.

    ``source`` is a model (its ``generation_config`` is read), a ``GenerationConfig``, or ``None``.
    """
    ids: set[int] = set()
    config = getattr(source, "generation_config", source)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def context_length(model: Any) -> int | None:
    """The number of positions the model attends to (``max_position_embeddings``), if it declares one."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_fits_context(
    model: Any, prompt_lengths: Sequence[int], max_new_tokens: int, *, what: str = "prompt", first_index: int = 0
) -> None:
    """Raise ``ValueError`` naming the first empty prompt, or one whose tokens plus ``max_new_tokens``
    exceed the model's context. ``prompt_lengths`` are token counts without padding; ``what`` and
    ``first_index`` name the prompts in the message.
    """
    limit = context_length(model)
    for offset, length in enumerate(prompt_lengths):
        if length == 0:
            raise ValueError(f"{what} {first_index + offset} is empty after tokenisation; give it some text")
        if limit is not None and length + max_new_tokens > limit:
            raise ValueError(
                f"{what} {first_index + offset} has {length} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{length + max_new_tokens} positions, more than the model's context of {limit}: shorten the prompt "
                "or lower max_new_tokens"
            )


def check_left_padded(attention_mask: Any, what: str = "attention_mask") -> None:
    """Raise ``ValueError`` when a row of ``attention_mask`` has padding after its text (right padding).

    Decoder-only generation continues each row from its last position; with right padding that is a pad
    token and the row's continuation is silently wrong. A tokenizer saved and reloaded (or built with
    ``AutoTokenizer``) pads on the right: tokenise with ``padding_side="left"``.
    """
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < 2:
        return
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        row = int((mask[:, 1:] < mask[:, :-1]).any(-1).long().argmax())
        raise ValueError(
            f"{what} row {row} is right-padded (padding after the text): decoder-only generation needs left "
            "padding; set tokenizer.padding_side = 'left' (or pass padding_side='left') before tokenising"
        )
