"""Per-request contrastive settings carried in vLLM's ``SamplingParams.extra_args``.

vLLM hands every custom logits processor each request's ``SamplingParams``; the only free-form slot
in it is ``extra_args``, which the OpenAI-compatible server fills from the request body's
``vllm_xargs`` (a flat dict of strings, numbers and lists of them: no nested dicts). So cdlm's
settings are flat keys with a ``cdlm_`` prefix, the same in Python and over HTTP::

    {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8", "cdlm_beta": 0.5}
    {"cdlm_method": "cid", "cdlm_contrastive_prompt_token_ids": [1, 2, 3], "cdlm_cid_lambda": 0.5}

Requests without ``cdlm_method`` are left untouched, so greedy, sampled and contrastive requests share
one engine and one batch. The rule itself (names, defaults, validation, the weight rule) is
``cdlm.decoding.contrast``; this module only adds what is vLLM-specific: the method, the amateur
spec and CID's contrastive prompt ids.

Importing this module imports neither vLLM nor torch: parsing and validation run, and are tested,
without vLLM installed (checking an ``early-exit:N`` spec imports cdlm's model helpers on first use).
These are the checks that need no model; ``served`` adds those against the model being served.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from cdlm.decoding.contrast import (
    CD_HYPERPARAMETERS,
    CID_HYPERPARAMETERS,
    DEFAULT_EOS_PROMOTION,
    DEFAULTS,
    ContrastSettings,
    check_eos_promotion,
    unused_hyperparameters,
    unused_message,
)

KEY_PREFIX = "cdlm_"
METHODS = {"cd": CD_HYPERPARAMETERS, "cid": CID_HYPERPARAMETERS}
# The amateur spec that means "the expert itself" (CID contrasts two inputs to one model).
SELF_AMATEUR = "self"
_NUMERIC = {name for name, value in DEFAULTS.items() if isinstance(value, float)}


def check_amateur_spec(spec: str) -> None:
    """Raise ``ValueError`` for a malformed ``early-exit:N`` spec (``served`` checks N against the model)."""
    from cdlm.models.amateur import parse_early_exit

    layers = parse_early_exit(spec)
    if layers is not None and layers < 1:
        raise ValueError(f"an early-exit amateur needs at least 1 layer, got {spec!r}")


@dataclass(frozen=True)
class ContrastParams:
    """The contrastive settings of one request; hyperparameter names and defaults are ``cdlm.decoding.contrast``'s.

    Attributes:
        method: ``"cd"`` (expert vs amateur model on the same text) or ``"cid"`` (the expert on the
            prompt vs the expert on ``contrastive_prompt_token_ids``).
        amateur: where the amateur's scores come from: ``"early-exit:N"`` (the expert's first N
            layers), ``"self"`` (the expert; CID's only choice), a name registered with
            ``register_amateur``, or a ``cdlm.models.load_model`` reference.
        alpha, beta, amateur_temperature, cd_formulation, cid_lambda: see ``cdlm.decoding.contrast.HELP``.
        eos_promotion: ``"forbid"`` (default, as in the transformers methods) or ``"allow"``; the
            processor fills in the served model's EOS ids.
        contrastive_prompt_token_ids: CID only: the contrastive input, tokenised exactly as the
            prompt was (vLLM only ever sees token ids).
    """

    method: str = "cd"
    amateur: str | None = None
    alpha: float = DEFAULTS["alpha"]
    beta: float = DEFAULTS["beta"]
    amateur_temperature: float = DEFAULTS["amateur_temperature"]
    cd_formulation: str = DEFAULTS["cd_formulation"]
    cid_lambda: float = DEFAULTS["cid_lambda"]
    eos_promotion: str = DEFAULT_EOS_PROMOTION
    contrastive_prompt_token_ids: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"cdlm_method must be one of {sorted(METHODS)}, got {self.method!r}")
        try:
            check_eos_promotion(self.eos_promotion)
        except ValueError as error:
            raise ValueError(f"cdlm setting: {error}") from None
        object.__setattr__(self, "_settings", self._build_settings())
        for name in METHODS[self.method]:  # validated above: store plain floats (JSON numbers, not numpy/str)
            if name in _NUMERIC:
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.method == "cid":
            ids = self.contrastive_prompt_token_ids
            if not ids or isinstance(ids, (str, bytes)):
                raise ValueError(
                    "method 'cid' needs cdlm_contrastive_prompt_token_ids (the tokenised contrastive input)"
                )
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError("cdlm_contrastive_prompt_token_ids must be non-negative integers")
            object.__setattr__(self, "contrastive_prompt_token_ids", tuple(ids))
            if self.amateur not in (None, SELF_AMATEUR):
                raise ValueError(
                    "method 'cid' contrasts the expert with itself; "
                    f"cdlm_amateur must be unset or 'self', got {self.amateur!r}"
                )
            object.__setattr__(self, "amateur", SELF_AMATEUR)
            return
        if self.contrastive_prompt_token_ids is not None:
            raise ValueError("cdlm_contrastive_prompt_token_ids is only used by method 'cid'")
        if self.amateur is None:
            raise ValueError("method 'cd' needs cdlm_amateur (e.g. 'early-exit:8' or a model reference)")
        if not isinstance(self.amateur, str) or not self.amateur:
            raise ValueError(f"cdlm_amateur must be a non-empty string, got {self.amateur!r}")
        check_amateur_spec(self.amateur)

    def _build_settings(self) -> ContrastSettings:
        values = {name: getattr(self, name) for name in METHODS[self.method]}
        try:
            return ContrastSettings.from_hyperparameters(self.method, values)
        except ValueError as error:
            raise ValueError(f"cdlm setting: {error}") from None

    @property
    def settings(self) -> ContrastSettings:
        """The validated contrast rule (``cdlm.decoding.contrast.ContrastSettings``) of this request."""
        return self._settings  # type: ignore[attr-defined]

    def rule(self, eos_ids: tuple[int, ...]) -> ContrastSettings:
        """The rule applied to this request's rows, given the served model's EOS ids."""
        return self.settings.forbidding_promotion_of(eos_ids) if self.eos_promotion == "forbid" else self.settings

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> "ContrastParams | None":
        """Parse a request's ``extra_args``; ``None`` when the request is not contrastive."""
        if not extra_args:
            return None
        ours = {
            k[len(KEY_PREFIX) :]: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(KEY_PREFIX)
        }
        if not ours:
            if "cdlm" in extra_args:
                raise ValueError(
                    "cdlm settings are flat extra_args keys with a 'cdlm_' prefix (cdlm_method, ...), not a dict"
                )
            return None
        known = {f.name for f in fields(cls)}
        unknown = set(ours) - known
        if unknown:
            raise ValueError(
                f"unknown cdlm setting(s) {sorted(KEY_PREFIX + k for k in unknown)}; "
                f"known: {sorted(KEY_PREFIX + k for k in known)}"
            )
        if "method" not in ours:
            raise ValueError(
                f"cdlm settings {sorted(KEY_PREFIX + k for k in ours)} given without cdlm_method ('cd' or 'cid')"
            )
        if ours["method"] in METHODS:
            foreign = (set(ours) & (set(CD_HYPERPARAMETERS) | set(CID_HYPERPARAMETERS))) - set(METHODS[ours["method"]])
            if foreign:
                raise ValueError(
                    f"{sorted(KEY_PREFIX + k for k in foreign)} not setting(s) of method {ours['method']!r}"
                )
            for name in unused_hyperparameters(ours["method"], ours):
                if name in ours:  # given, but the rule ignores it: refused rather than recorded as if used
                    raise ValueError(f"{KEY_PREFIX}{name}: {unused_message(name)}")
        values = dict(ours)
        ids = values.get("contrastive_prompt_token_ids")
        if ids is not None:
            if not isinstance(ids, (list, tuple)):
                raise ValueError(
                    f"cdlm_contrastive_prompt_token_ids must be a list of token ids, got {type(ids).__name__}"
                )
            values["contrastive_prompt_token_ids"] = tuple(ids)
        return cls(**values)

    def to_extra_args(self) -> dict[str, Any]:
        """Flat ``extra_args`` for ``SamplingParams`` (also the ``vllm_xargs`` of an HTTP request).

        Only the method's own hyperparameters that its rule uses are written (no ``beta`` for Li's CD),
        so the dict is what a user would type and ``from_extra_args`` accepts it.
        """
        values: dict[str, Any] = {"method": self.method}
        if self.method == "cd":
            values["amateur"] = self.amateur
        own = {name: getattr(self, name) for name in METHODS[self.method]}
        unused = unused_hyperparameters(self.method, own)
        values.update({name: value for name, value in own.items() if name not in unused})
        values["eos_promotion"] = self.eos_promotion
        if self.contrastive_prompt_token_ids is not None:
            values["contrastive_prompt_token_ids"] = list(self.contrastive_prompt_token_ids)
        return {KEY_PREFIX + k: v for k, v in values.items()}
