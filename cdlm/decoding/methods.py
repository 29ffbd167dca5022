"""The registry of decoding methods shared by ``cdlm generate``, the eval harness and benchmarks.

A method turns hyperparameters into keyword arguments for ``model.generate()`` (a logits processor,
a ``custom_generate`` callable, sampling flags). Adding a method is one entry in ``_METHODS``; its
class declares its hyperparameters once (``Param``) and the CLI flags, validation messages and
results-file records all come from that declaration.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from cdlm.decoding.contrast import (
    CD_HYPERPARAMETERS,
    CID_HYPERPARAMETERS,
    DEFAULT_EOS_PROMOTION,
    DEFAULTS,
    EOS_PROMOTION_HELP,
    HELP,
    PLAIN_LOGLIKELIHOOD,
    ContrastSettings,
    ScoringRule,
    check_eos_promotion,
    unused_hyperparameters,
    unused_message,
)
from cdlm.decoding.dola_settings import (  # noqa: F401  (re-exported: the registry's DoLa names)
    DEFAULT_DOLA_LAYERS,
    DEFAULT_RELATIVE_TOP,
    DEFAULT_REPETITION_PENALTY,
    DOLA_FORMS,
    candidate_layers,
    parse_dola_layers,
    validate_dola_params,
)

if TYPE_CHECKING:  # the registry imports neither torch nor transformers (fast `cdlm --help`)
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a method: CLI flag ``--name-with-dashes``, type, default and help."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def check_num_beams(num_beams: Any) -> int:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    return num_beams


class DecodingMethod(ABC):
    """A configured decoding method for one expert model.

    Subclasses validate their hyperparameters in ``validate`` (raising ``ValueError`` naming the bad
    value; no model needed, so commands check them before loading one) and build the ``generate()``
    keyword arguments for each batch of prompts.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_amateur: ClassVar[bool] = False
    needs_contrastive_inputs: ClassVar[bool] = False

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", *, amateur=None, **params):
        self.model = model
        self.tokenizer = tokenizer
        self.amateur = amateur
        self.hyperparameters = self.resolve_hyperparameters(params)
        if self.needs_amateur and amateur is None:
            raise ValueError(f"method {self.name!r} needs an amateur (e.g. --amateur early-exit:8)")

    @classmethod
    def resolve_hyperparameters(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Every hyperparameter with defaults filled in, validated without a model (so commands can
        refuse bad values before loading one). Raises ``ValueError`` naming the bad value."""
        unknown = set(params) - {p.name for p in cls.params}
        if unknown:
            raise ValueError(f"method {cls.name!r} has no hyperparameter(s) {sorted(unknown)}")
        hyperparameters = {p.name: params.get(p.name, p.default) for p in cls.params}
        cls.validate(hyperparameters)
        for name in cls.unused_hyperparameters(hyperparameters):
            if name in params:
                raise ValueError(f"method {cls.name!r}: {unused_message(name)}")
        return hyperparameters

    @classmethod
    def unused_hyperparameters(cls, hyperparameters: dict[str, Any]) -> tuple[str, ...]:
        """Hyperparameters these settings make irrelevant; giving one explicitly is refused."""
        return ()

    @classmethod
    def validate(cls, hyperparameters: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a bad value; subclasses check their own hyperparameters here."""

    @abstractmethod
    def generate_kwargs(self, batch: "BatchEncoding", contrastive_batch: "BatchEncoding | None" = None) -> dict:
        """Keyword arguments for ``model.generate(**batch, **kwargs)`` on this batch."""

    def scoring_rule(self):
        """How this method scores a *given* continuation in log-likelihood tasks (``cdlm.eval_harness``).

        Default: the expert's plain log-likelihood (greedy, sampling and contrastive search change which
        text is generated, not how a fixed text is scored). Contrastive methods override this.
        """
        return PLAIN_LOGLIKELIHOOD

    def describe(self) -> dict:
        """What goes into results files: the method name and its effective hyperparameters."""
        record = {"method": self.name, **self.hyperparameters}
        if self.amateur is not None:
            record["amateur"] = getattr(self.amateur, "name", type(self.amateur).__name__)
            record["amateur_kind"] = getattr(self.amateur, "kind", "separate")
        return record


class Greedy(DecodingMethod):
    name = "greedy"
    description = "argmax of the expert's next-token distribution"

    def generate_kwargs(self, batch, contrastive_batch=None):
        return {"do_sample": False, "num_beams": 1}


class Sampling(DecodingMethod):
    name = "sample"
    description = "ancestral sampling with temperature, top-k, top-p and typical-p"
    params = (
        Param("temperature", float, 1.0, "softmax temperature (> 0)"),
        Param("top_k", int, 0, "keep the k most likely tokens (0: off)"),
        Param("top_p", float, 1.0, "nucleus mass to keep, in (0, 1]"),
        Param(
            "typical_p", float, 1.0, "locally typical sampling mass to keep, in (0, 1] (Meister et al. 2022; 1: off)"
        ),
    )

    @classmethod
    def validate(cls, hp):
        if not (hp["temperature"] > 0 and math.isfinite(hp["temperature"])):
            raise ValueError(f"temperature must be > 0 and finite, got {hp['temperature']}")
        if hp["top_k"] < 0:
            raise ValueError(f"top_k must be >= 0, got {hp['top_k']}")
        if not 0 < hp["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {hp['top_p']}")
        if not 0 < hp["typical_p"] <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {hp['typical_p']}")

    def generate_kwargs(self, batch, contrastive_batch=None):
        hp = self.hyperparameters
        return {
            "do_sample": True,
            "temperature": hp["temperature"],
            "top_k": hp["top_k"] or None,
            "top_p": hp["top_p"],
            "typical_p": hp["typical_p"],
        }


def _protected_ids(method: DecodingMethod, eos_promotion: str) -> list[int]:
    """The ids whose promotion ``eos_promotion="forbid"`` rules out: every EOS id of the expert."""
    from cdlm.models.prompts import eos_token_ids

    return eos_token_ids(method.model, method.tokenizer) if eos_promotion == "forbid" else []


def _contrast_params(names: tuple[str, ...]) -> tuple[Param, ...]:
    """The registry parameters of a contrast method: its rule's hyperparameters, the EOS rule, beams."""
    return (
        *(Param(name, type(DEFAULTS[name]), DEFAULTS[name], HELP[name]) for name in names),
        Param("eos_promotion", str, DEFAULT_EOS_PROMOTION, EOS_PROMOTION_HELP),
        Param("num_beams", int, 1, "beam search width (1: greedy)"),
    )


class _ContrastMethod(DecodingMethod):
    """What CD and CID share: settings built and validated by ``cdlm.decoding.contrast``, greedy/beam kwargs."""

    contrast_kind: ClassVar[str]  # "cd" or "cid": the rule ``ContrastSettings.from_hyperparameters`` builds

    @classmethod
    def unused_hyperparameters(cls, hyperparameters):
        return unused_hyperparameters(cls.contrast_kind, hyperparameters)

    @classmethod
    def validate(cls, hp):
        ContrastSettings.from_hyperparameters(cls.contrast_kind, hp)
        check_eos_promotion(hp["eos_promotion"])
        check_num_beams(hp["num_beams"])

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.settings = ContrastSettings.from_hyperparameters(self.contrast_kind, self.hyperparameters)

    def _decode_with(self, processor) -> dict:
        from transformers import LogitsProcessorList

        num_beams = self.hyperparameters["num_beams"]
        return {"do_sample": False, "num_beams": num_beams, "logits_processor": LogitsProcessorList([processor])}


class ContrastiveDecodingMethod(_ContrastMethod):
    """``cdlm generate --method cd``: greedy (or beam) decoding on the contrastive-decoding scores.

    The processors live in ``cdlm.decoding.contrastive_decoding`` (imported when a batch is built).
    """

    name = "cd"
    description = "contrastive decoding: expert minus amateur on the expert's plausible tokens"
    needs_amateur = True
    contrast_kind = "cd"
    params = _contrast_params(CD_HYPERPARAMETERS)

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        if getattr(self.amateur, "kind", None) == "early-exit" and self.amateur.expert is not model:
            raise ValueError("the early-exit amateur was built from a different model than the expert being decoded")

    def scoring_rule(self):
        """Log-likelihood tasks: ``expert_ll - weight * amateur_ll`` of the same tokens, with CD's weight rule."""
        return ScoringRule("contrastive", contrast="amateur", weight=self.settings.weight, amateur=self.amateur)

    def generate_kwargs(self, batch: "BatchEncoding", contrastive_batch: "BatchEncoding | None" = None) -> dict:
        from cdlm.decoding.contrastive_decoding import contrastive_decoding_processor

        hp = self.hyperparameters
        processor = contrastive_decoding_processor(
            self.amateur,
            alpha=hp["alpha"],
            beta=hp["beta"],
            formulation=hp["cd_formulation"],
            amateur_temperature=hp["amateur_temperature"],
            special_ids=_protected_ids(self, hp["eos_promotion"]),
            attention_mask=batch.get("attention_mask"),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self._decode_with(processor)


class ContrastiveInputMethod(_ContrastMethod):
    """``cdlm generate --method cid --contrastive-prompt ...``: greedy (or beam) decoding on CID scores.

    The processor lives in ``cdlm.decoding.contrastive_input`` (imported when a batch is built).
    """

    name = "cid"
    description = "contrastive input decoding: likely given the prompt, unlikely given the contrastive prompt"
    needs_contrastive_inputs = True
    contrast_kind = "cid"
    params = _contrast_params(CID_HYPERPARAMETERS)

    def scoring_rule(self):
        """Log-likelihood tasks: ``ll(continuation | context) - cid_lambda * ll(continuation | contrastive ctx)``."""
        return ScoringRule("contrastive-input", contrast="contrastive-input", weight=self.settings.weight)

    def generate_kwargs(self, batch: "BatchEncoding", contrastive_batch: "BatchEncoding | None" = None) -> dict:
        from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor

        if contrastive_batch is None:
            raise ValueError("method 'cid' needs a contrastive input per prompt")
        rows, contrastive_rows = batch["input_ids"].shape[0], contrastive_batch["input_ids"].shape[0]
        if rows != contrastive_rows:
            raise ValueError(
                f"got {contrastive_rows} contrastive inputs for a batch of {rows} inputs; give one per input"
            )
        hp = self.hyperparameters
        processor = ContrastiveInputLogitsProcessor(
            self.model,
            contrastive_batch["input_ids"],
            contrastive_batch.get("attention_mask"),
            cid_lambda=hp["cid_lambda"],
            alpha=hp["alpha"],
            pad_token_id=self.tokenizer.pad_token_id,
            special_ids=_protected_ids(self, hp["eos_promotion"]),
        )
        return self._decode_with(processor)


DEFAULT_PENALTY_ALPHA = 0.6
DEFAULT_TOP_K = 4


def validate_contrastive_search_params(penalty_alpha: Any, top_k: Any) -> tuple[float, int]:
    """Check and normalise contrastive search's two hyperparameters; ``ValueError`` names the bad one."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an integer >= 1 for contrastive search, got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 for contrastive search, got {top_k}")
    try:
        alpha = float(penalty_alpha)
    except (TypeError, ValueError):
        raise ValueError(f"penalty_alpha must be a number in [0, 1], got {penalty_alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"penalty_alpha must be in [0, 1], got {penalty_alpha}")
    return alpha, top_k


class ContrastiveSearchMethod(DecodingMethod):
    """``cdlm generate --method cs --penalty-alpha 0.6 --top-k 4``.

    The ``custom_generate`` callable lives in ``cdlm.decoding.contrastive_search`` (imported when a batch is built).
    """

    name = "cs"
    description = "contrastive search: top-k candidates re-ranked by a degeneration penalty (Su et al. 2022)"
    params = (
        Param("penalty_alpha", float, DEFAULT_PENALTY_ALPHA, "contrastive search degeneration penalty, in [0, 1]"),
        Param("top_k", int, DEFAULT_TOP_K, "contrastive search: number of candidate tokens (>= 1)"),
    )

    @classmethod
    def validate(cls, hp):
        hp["penalty_alpha"], hp["top_k"] = validate_contrastive_search_params(hp["penalty_alpha"], hp["top_k"])

    def generate_kwargs(self, batch: "BatchEncoding", contrastive_batch: "BatchEncoding | None" = None) -> dict:
        from cdlm.decoding.contrastive_search import contrastive_search

        hp = self.hyperparameters
        return {
            "custom_generate": contrastive_search,
            "penalty_alpha": hp["penalty_alpha"],
            "top_k": hp["top_k"],
            "do_sample": False,
            "num_beams": 1,
        }


# ---------------------------------------------------------------- DoLa (the decoding loop: cdlm.decoding.dola)
class DolaMethod(DecodingMethod):
    """``dola`` in the method registry: ``cdlm generate --method dola --dola-layers high``."""

    name = "dola"
    description = "DoLa: final-layer log-probs minus a premature layer's, layer chosen per step (Chuang et al. 2023)"
    params = (
        Param(
            "dola_layers",
            str,
            DEFAULT_DOLA_LAYERS,
            "DoLa candidate premature layers: low, high, or indices like 4,10,16 (0 = embeddings)",
        ),
        Param(
            "relative_top", float, DEFAULT_RELATIVE_TOP, "DoLa plausibility cut: keep tokens with p >= this * max p"
        ),
        Param(
            "dola_form",
            str,
            "transformers",
            "DoLa form: transformers (4.55.4: bare head on premature layers) or paper (final norm, true JSD)",
        ),
        Param("repetition_penalty", float, DEFAULT_REPETITION_PENALTY, "repetition penalty (> 0; 1.0: off)"),
    )

    @classmethod
    def validate(cls, hp):
        hp["relative_top"], hp["dola_form"] = validate_dola_params(hp["relative_top"], hp["dola_form"])
        parse_dola_layers(hp["dola_layers"])
        penalty = hp["repetition_penalty"]
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not (0 < penalty < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty!r}")

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        from cdlm.models.lm_head import depth_and_tying

        # The layer indices need the model's depth: checked here, before any generation.
        candidate_layers(self.hyperparameters["dola_layers"], *depth_and_tying(model))

    def generate_kwargs(self, batch: "BatchEncoding", contrastive_batch: "BatchEncoding | None" = None) -> dict:
        from cdlm.decoding.dola import dola

        hp = self.hyperparameters
        return {
            "custom_generate": dola,
            "dola_layers": parse_dola_layers(hp["dola_layers"]),
            "relative_top": hp["relative_top"],
            "dola_form": hp["dola_form"],
            "repetition_penalty": hp["repetition_penalty"],
            "do_sample": False,
            "num_beams": 1,
        }


# name -> "module:Class". Imported lazily so `cdlm --help` stays fast and optional pieces stay optional.
_METHODS: dict[str, str] = {
    "greedy": "cdlm.decoding.methods:Greedy",
    "sample": "cdlm.decoding.methods:Sampling",
    "cd": "cdlm.decoding.methods:ContrastiveDecodingMethod",
    "cid": "cdlm.decoding.methods:ContrastiveInputMethod",
    "cs": "cdlm.decoding.methods:ContrastiveSearchMethod",
    "dola": "cdlm.decoding.methods:DolaMethod",
}


def available_methods() -> list[str]:
    """Registered method names whose implementation can be imported."""
    names = []
    for name in _METHODS:
        try:
            get_method(name)
        except (ImportError, AttributeError):
            continue
        names.append(name)
    return names


def get_method(name: str) -> type[DecodingMethod]:
    try:
        target = _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown decoding method {name!r}; known methods: {', '.join(_METHODS)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
