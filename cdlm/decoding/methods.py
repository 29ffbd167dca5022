"""The registry of decoding methods shared by ``cdlm generate``, the eval harness and benchmarks.

A method turns hyperparameters into keyword arguments for ``model.generate()`` (a logits processor,
a ``custom_generate`` callable, sampling flags). Adding a method is one entry in ``_METHODS``; its
class declares its hyperparameters once (``Param``) and the CLI flags, validation messages and
results-file records all come from that declaration.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

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


class DecodingMethod(ABC):
    """A configured decoding method for one expert model.

    Subclasses validate their hyperparameters in ``__init__`` (raising ``ValueError`` naming the bad
    value) and build the ``generate()`` keyword arguments for each batch of prompts.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_amateur: ClassVar[bool] = False
    needs_contrastive_inputs: ClassVar[bool] = False

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, amateur=None, **params):
        self.model = model
        self.tokenizer = tokenizer
        self.amateur = amateur
        unknown = set(params) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyperparameter(s) {sorted(unknown)}")
        self.hyperparameters = {p.name: params.get(p.name, p.default) for p in self.params}
        if self.needs_amateur and amateur is None:
            raise ValueError(f"method {self.name!r} needs an amateur (e.g. --amateur early-exit:8)")

    @abstractmethod
    def generate_kwargs(self, batch: BatchEncoding, contrastive_batch: BatchEncoding | None = None) -> dict:
        """Keyword arguments for ``model.generate(**batch, **kwargs)`` on this batch."""

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
    description = "ancestral sampling with temperature, top-k and top-p"
    params = (
        Param("temperature", float, 1.0, "softmax temperature (> 0)"),
        Param("top_k", int, 0, "keep the k most likely tokens (0: off)"),
        Param("top_p", float, 1.0, "nucleus mass to keep, in (0, 1]"),
    )

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        hp = self.hyperparameters
        if hp["temperature"] <= 0:
            raise ValueError(f"temperature must be > 0, got {hp['temperature']}")
        if hp["top_k"] < 0:
            raise ValueError(f"top_k must be >= 0, got {hp['top_k']}")
        if not 0 < hp["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {hp['top_p']}")

    def generate_kwargs(self, batch, contrastive_batch=None):
        hp = self.hyperparameters
        return {"do_sample": True, "temperature": hp["temperature"], "top_k": hp["top_k"] or None, "top_p": hp["top_p"]}


# name -> "module:Class". Imported lazily so `cdlm --help` stays fast and optional pieces stay optional.
_METHODS: dict[str, str] = {
    "greedy": "cdlm.decoding.methods:Greedy",
    "sample": "cdlm.decoding.methods:Sampling",
    "cd": "cdlm.decoding.contrastive_decoding:ContrastiveDecodingMethod",
    "cid": "cdlm.decoding.contrastive_input:ContrastiveInputMethod",
    "cs": "cdlm.decoding.contrastive_search:ContrastiveSearchMethod",
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
