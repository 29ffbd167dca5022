"""Plumbing every cdlm ``custom_generate`` decoding loop shares (contrastive search, DoLa).

transformers 5 hands a ``custom_generate`` callable the model kwargs ``generate()`` prepared, drops
``generate()``'s ``tokenizer`` argument whenever the callable is a function, and routes extra keyword
arguments by the callable's signature. These helpers do the three things each loop needs about that,
once: split off what the loop manages itself, turn ``stop_strings`` into a stopping criterion, and make a
module usable as ``custom_generate=cdlm.decoding.<module>``.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Callable

# Model kwargs a decoding loop sets per step itself; generate()'s values for them are dropped.
_LOOP_MANAGED = (
    "position_ids",
    "use_cache",
    "logits_to_keep",
    "cache_position",
    "inputs_embeds",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
)


def split_model_kwargs(model_kwargs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``(attention_mask, past_key_values, extra)``: ``extra`` holds the other non-None model kwargs.

    A right-padded ``attention_mask`` is refused: every loop continues each row from its last position. So
    is transformers' ``cache`` kwarg (5.24 renamed ``past_key_values`` to ``cache``): the loops would keep
    their own cache while the model used generate's, and decode wrong tokens without an error.
    """
    from cdlm.models.prompts import check_left_padded

    if "cache" in model_kwargs:
        import transformers

        raise ValueError(
            f"transformers {transformers.__version__} passes the KV cache as `cache`; cdlm's contrastive search and "
            "DoLa support transformers < 5.24 (past_key_values): pip install 'transformers>=5.16.1,<5.24'"
        )
    attention_mask = model_kwargs.pop("attention_mask", None)
    check_left_padded(attention_mask)
    cache = model_kwargs.pop("past_key_values", None)
    for name in _LOOP_MANAGED:
        model_kwargs.pop(name, None)
    return attention_mask, cache, {name: value for name, value in model_kwargs.items() if value is not None}


def stop_strings_as_criterion(generate_kwargs: dict[str, Any]) -> None:
    """Move ``stop_strings`` (with ``tokenizer``) into ``stopping_criteria`` as a ``StopStringCriteria``, in place."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    stop_strings = generate_kwargs.pop("stop_strings", None)
    tokenizer = generate_kwargs.pop("tokenizer", None)
    if not stop_strings:
        return
    if tokenizer is None:
        raise ValueError("stop_strings need the model's tokenizer: pass tokenizer=...")
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    generate_kwargs["stopping_criteria"] = criteria


def make_module_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Let the module itself be passed as ``custom_generate``: calling it calls ``function``.

    transformers routes extra ``generate()`` kwargs by the callable's signature, which the module's
    ``__signature__`` supplies.
    """

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
