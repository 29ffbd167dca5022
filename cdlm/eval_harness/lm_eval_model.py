"""cdlm as an lm-evaluation-harness (0.4.x) model: any lm-eval task with any cdlm decoding method.

    pip install 'cdlm[lmeval]'
    cdlm-lm-eval --model cdlm \\
        --model_args pretrained=smollm2-135m-instruct,method=cd,amateur=early-exit:8,beta=0.5 --tasks cdlm_hellaswag

The command line is lm-eval's own (``cdlm.eval_harness.lm_eval_cli``, which also adds cdlm's packaged,
offline tasks): this module registers the ``cdlm`` model with ``lm_eval.api.registry.register_model``.
lm-eval 0.4.13 discovers models only through that registry (it reads no entry points), so the model
exists in any process that imported this module: ``cdlm-lm-eval``, ``python -m
cdlm.eval_harness.lm_eval_model``, or ``import cdlm.eval_harness.lm_eval_model`` before
``lm_eval.simple_evaluate(model="cdlm", ...)``. ``device``: lm-eval passes ``cuda:0`` by default; on a
machine without CUDA the model runs on the CPU with a warning, as lm-eval's own ``hf`` model does.

``model_args``: ``pretrained`` (any ``cdlm.models.load_model`` reference: a registered name, GGUF,
folder or hub id), ``method`` (a registered decoding method, default greedy), ``amateur`` (``early-exit:N``
or a model reference, for methods that need one), ``dtype``, ``gguf_file``, ``max_gen_toks`` and the
method's own hyperparameters (``beta``, ``alpha``, ...; the names ``cdlm generate`` takes).

* ``loglikelihood``: requests that share a context are scored together with cdlm's shared-context
  scorer (the token sequences are lm-eval's ``_encode_pair``), under the method's scoring rule
  (``DecodingMethod.scoring_rule``): plain log-likelihood, or CD's ``expert - beta * amateur``.
  ``is_greedy`` is the expert's. Methods that contrast with a second *input* (``cid``) are refused:
  lm-eval requests carry no contrastive input.
* ``generate_until``: the method decodes (``cdlm.decoding.runner.generate``), stopping at ``until``
  (+ EOS, as lm-eval's HF model does) after at most ``max_gen_toks`` tokens. The method decides how
  tokens are chosen; ``do_sample``/``temperature`` in the task's ``generation_kwargs`` are ignored.
* ``loglikelihood_rolling`` (perplexity tasks): the whole text after the prefix token, plain or
  contrastive; texts longer than the model's context are refused rather than windowed.
"""

from __future__ import annotations

import sys
from typing import Any

from cdlm.eval_harness.lm_eval_tasks import available_device, check_lm_eval

check_lm_eval()  # one line naming the extra, instead of a ModuleNotFoundError traceback

import lm_eval.models  # noqa: E402, F401  (lm-eval's own models stay registered next to ours)
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

NAME = "cdlm"


def _typed(params, values: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` values cast to the types the method declares (lm-eval guesses int/float/bool/str)."""
    declared = {p.name: p.type for p in params}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ValueError(f"unknown model_args {unknown}; the method takes {sorted(declared)}")
    return {name: declared[name](value) for name, value in values.items()}


class CdlmLM(LM):
    """An lm-eval ``LM`` backed by a cdlm model and decoding method (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "greedy",
        amateur: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        gguf_file: str | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        from cdlm.decoding.methods import get_method
        from cdlm.models.loading import load_amateur, load_model
        from cdlm.models.registry import DEFAULT_MODEL

        self.loaded = load_model(
            pretrained or DEFAULT_MODEL, gguf_file=gguf_file, dtype=dtype, device=available_device(device)
        )
        method_class = get_method(method)
        amateur_model = None
        if method_class.needs_amateur:
            if amateur is None:
                raise ValueError(
                    f"method {method!r} needs an amateur: add amateur=early-exit:N (or a model) to model_args"
                )
            amateur_model = load_amateur(str(amateur), self.loaded, dtype=dtype)
        self.method = method_class(
            self.loaded.model,
            self.loaded.tokenizer,
            amateur=amateur_model,
            **_typed(method_class.params, hyperparameters),
        )
        self.rule = self.method.scoring_rule()
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # --- log-likelihoods -----------------------------------------------------------------------------------

    def _score(self, groups: list[tuple[str, list[str]]]) -> list[tuple[list[float], list[bool]]]:
        """(scores under the method's rule, expert is_greedy) per continuation, for (context, continuations) groups."""
        from cdlm.eval_harness.scoring import check_fits_model, score_under_rule

        if self.rule.contrast == "contrastive-input":
            raise ValueError(
                f"method {self.method.name!r} contrasts with a second input, which lm-eval requests do not carry; "
                "use cdlm eval for it"
            )
        # lm-eval's HF model adds no special tokens to text that already starts with BOS (chat templates), so
        # contexts are encoded one kind at a time.
        bos = self.loaded.tokenizer.bos_token
        out: list = [None] * len(groups)
        for add_special in (True, False):
            mine = [i for i, (context, _) in enumerate(groups) if bool(bos and context.startswith(bos)) != add_special]
            if not mine:
                continue
            # lm-eval's hf model cuts such contexts from the left; cdlm refuses rather than score other text.
            check_fits_model(
                self.loaded.model,
                self.loaded.tokenizer,
                [groups[i] for i in mine],
                add_special_tokens=add_special,
                what="lm-eval request",
            )
            responses = score_under_rule(
                self.loaded.model,
                self.loaded.tokenizer,
                self.rule,
                [(groups[i][0], groups[i][1], None) for i in mine],
                add_special_tokens=add_special,
                batch_size=self.batch_size,
            )
            for i, response in zip(mine, responses):
                out[i] = (response.scores, response.is_greedy)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # Requests sharing a context (the choices of one multiple-choice question) are scored together.
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.args[0], []).append(index)
        contexts = list(groups)
        scored = self._score([(c, [requests[i].args[1] for i in groups[c]]) for c in contexts])
        results: list = [None] * len(requests)
        for context, (scores, greedy) in zip(contexts, scored):
            for index, score, is_greedy in zip(groups[context], scores, greedy):
                results[index] = (score, is_greedy)
                self.cache_hook.add_partial("loglikelihood", requests[index].args, (score, is_greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from cdlm.models.prompts import context_length

        limit = context_length(self.loaded.model)
        out = []
        for request in requests:
            (text,) = request.args
            length = len(self.loaded.tokenizer.encode(text, add_special_tokens=False)) + 1
            if limit is not None and length > limit:
                raise ValueError(
                    f"a rolling log-likelihood text has {length} tokens, more than the model's context of {limit}"
                )
            ((scores, _),) = self._score([("", [text])])
            out.append(scores[0])
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), scores[0])
        return out

    # --- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from cdlm.decoding.runner import generate

        if getattr(self.method, "needs_contrastive_inputs", False):
            raise ValueError(
                f"method {self.method.name!r} needs a contrastive input per prompt; lm-eval requests carry none"
            )
        tokenizer = self.loaded.tokenizer
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            kwargs = request.args[1] or {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if tokenizer.eos_token and tokenizer.eos_token not in until:  # as lm-eval's HF model does
                until.append(tokenizer.eos_token)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((tuple(until), budget), []).append(index)
        results: list = [None] * len(requests)
        for (until, budget), indices in groups.items():
            generations, _ = generate(
                self.loaded.model,
                tokenizer,
                [requests[i].args[0] for i in indices],
                self.method,
                max_new_tokens=budget,
                batch_size=self.batch_size,
                stop=list(until),
            )
            for index, generation in zip(indices, generations):
                results[index] = generation.text
                self.cache_hook.add_partial("generate_until", requests[index].args, generation.text)
        return results

    # --- chat templates (lm-eval's --apply_chat_template) ---------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.loaded.tokenizer, "name_or_path", self.loaded.reference)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.loaded.tokenizer, "chat_template", None) if chat_template is not False else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        rendered = self.loaded.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )
        return str(rendered)


if __name__ == "__main__":  # `python -m`: register and run through the importable modules, not this __main__ copy
    from cdlm.eval_harness.lm_eval_cli import main

    sys.exit(main())
else:
    register_model(NAME)(CdlmLM)
