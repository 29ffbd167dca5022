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
    ContrastSettings,
    check_eos_promotion,
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
        return hyperparameters

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
        from cdlm.eval_harness.task import PLAIN_LOGLIKELIHOOD

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
        from cdlm.eval_harness.task import ScoringRule

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
        from cdlm.eval_harness.task import ScoringRule

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
DEFAULT_DOLA_LAYERS = "high"
DEFAULT_RELATIVE_TOP = 0.1  # the paper's alpha; fixed at 0.1 in 4.55.4
# The paper and 4.55.4's documentation recommend a repetition penalty of 1.2 with DoLa; the plain function
# and the registry method use it, the ``custom_generate`` callable takes generate()'s own (default 1.0).
DEFAULT_REPETITION_PENALTY = 1.2
DOLA_FORMS = ("transformers", "paper")


def parse_dola_layers(dola_layers: Any) -> str | tuple[int, ...]:
    """``"low"``, ``"high"``, or a tuple of ints from a list/tuple or a comma-separated string (the CLI form)."""
    if isinstance(dola_layers, str):
        text = dola_layers.strip()
        if text in ("low", "high"):
            return text
        try:
            dola_layers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"dola_layers must be 'low', 'high' or layer indices like '4,10,16', got {dola_layers!r}"
            ) from None
    if isinstance(dola_layers, (list, tuple)) and dola_layers:
        if any(isinstance(layer, bool) or not isinstance(layer, int) for layer in dola_layers):
            raise ValueError(f"dola_layers must be a list of integer layer indices, got {dola_layers!r}")
        return tuple(dict.fromkeys(dola_layers))  # order kept: ties go to the first listed layer
    raise ValueError(f"dola_layers must be 'low', 'high' or a non-empty list of layer indices, got {dola_layers!r}")


def candidate_layers(dola_layers: Any, num_layers: int, tied_embeddings: bool) -> tuple[int, ...]:
    """The premature layers DoLa chooses from, as indices into ``output_hidden_states`` (0 = embeddings).

    ``"low"``/``"high"`` follow 4.55.4: every second layer of the lower/upper half (of the first/last
    20 layers beyond 40 layers); with tied embeddings the lower half starts at layer 2, because
    layer 0 read through the tied head is nearly the identity map.
    """
    parsed = parse_dola_layers(dola_layers)
    if isinstance(parsed, tuple):
        bad = [layer for layer in parsed if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(
                f"dola_layers {list(bad)} out of range: premature layers are 0 (embeddings) .. {num_layers - 1} "
                f"for a model with {num_layers} layers (layer {num_layers} is the final layer itself)"
            )
        return parsed
    if not tied_embeddings:
        start = 0
    else:
        start = 2 if num_layers > 2 else (1 if num_layers == 2 else 0)
    half = num_layers // 2
    if parsed == "low":
        if start == half:
            return (start,)
        return tuple(range(start, half, 2) if num_layers <= 40 else range(start, 20, 2))
    return tuple(range(half, num_layers, 2) if num_layers <= 40 else range(num_layers - 20, num_layers, 2))


def validate_dola_params(relative_top: Any, dola_form: Any) -> tuple[float, str]:
    """Check and normalise the scalar hyperparameters; ``ValueError`` names the bad one."""
    try:
        top = float(relative_top)
    except (TypeError, ValueError):
        raise ValueError(f"relative_top must be a number in (0, 1], got {relative_top!r}") from None
    if not 0.0 < top <= 1.0:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}")
    if dola_form not in DOLA_FORMS:
        raise ValueError(f"dola_form must be one of {', '.join(DOLA_FORMS)}, got {dola_form!r}")
    return top, dola_form


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

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        hp = self.hyperparameters
        hp["relative_top"], hp["dola_form"] = validate_dola_params(hp["relative_top"], hp["dola_form"])
        from cdlm.decoding.dola import _depth_and_tying

        candidate_layers(hp["dola_layers"], *_depth_and_tying(model))  # fail now, not mid-run
        if hp["repetition_penalty"] <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {hp['repetition_penalty']}")

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
