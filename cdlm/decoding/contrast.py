"""The contrast rule of contrastive decoding (CD) and contrastive input decoding (CID), in one place.

Both methods keep only tokens the expert finds *plausible* and subtract (a multiple of) a second
distribution's log-probability from the expert's: an amateur model's for CD, the same model on a
contrastive input for CID. Everything that defines the rule lives here: the formulations, their
defaults, the validation of every hyperparameter, the weight rule (Li et al.'s CD has weight 1 whatever
``beta`` says) and the maths. The transformers processors, the method registry, the vLLM backend and
the eval harness all build a :class:`ContrastSettings` and call :meth:`ContrastSettings.apply`, so
they cannot drift apart.

Importing this module does not import torch; the tensor functions import it when called, so the
command line can read defaults and help texts cheaply. Tensors are ``(rows, vocab)``; every
function allocates O(rows x vocab) memory and never modifies its inputs.

>>> ContrastSettings.for_cd()  # Li et al.'s form: lp_e - lp_a on the plausible set
ContrastSettings(formulation='li', alpha=0.1, weight=1.0, other_temperature=1.0, special_ids=())
>>> ContrastSettings.for_cd(formulation="obrien-lewis", beta=0.5).weight  # (1 + beta) lp_e - beta lp_a
0.5
>>> ContrastSettings.for_cid(cid_lambda=0.25).formulation, ContrastSettings.for_cid(cid_lambda=0.25).weight
('li', 0.25)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

if TYPE_CHECKING:
    import torch

FORMULATIONS = ("obrien-lewis", "li")
# Li et al.'s form won the held-out open-ended comparison on SmolLM2 (diversity 0.81 vs 0.65 for
# O'Brien-Lewis beta 0.5, whose text was as repetitive as greedy's; benchmarks/results/openended_*).
DEFAULT_FORMULATION = "li"
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 0.5
DEFAULT_CID_LAMBDA = 0.5
DEFAULT_AMATEUR_TEMPERATURE = 1.0
# Li et al. (2022) subtract the amateur's log-probs with weight 1; their rule takes no beta.
LI_CD_WEIGHT = 1.0

# The hyperparameter names each method exposes (registry, CLI flags, vLLM ``extra_args``), with help.
CD_HYPERPARAMETERS = ("alpha", "beta", "amateur_temperature", "cd_formulation")
CID_HYPERPARAMETERS = ("cid_lambda", "alpha")
HELP = {
    "alpha": "plausibility threshold in (0, 1]: keep tokens with p >= alpha * max p",
    "beta": "contrast strength in [0, 100] (O'Brien-Lewis form; 0 = greedy)",
    "amateur_temperature": "temperature in [0.01, 100] applied to the amateur's logits",
    "cd_formulation": "obrien-lewis ((1+beta) s_e - beta s_a) or li (lp_e - lp_a)",
    "cid_lambda": "contrast strength lambda in [0, 100] (0 = greedy on the prompt)",
}
# EOS promotion. An early-exit amateur gives EOS almost no mass (SmolLM2 early-exit:8: p(EOS) ~ 2e-18), so
# wherever EOS is plausible for the expert its contrast is huge and CD ends answers before they start
# (first token on half of zero-shot GSM8K prompts; helper `open`'s study). "forbid": EOS ids keep a score
# only in rows where the expert itself ranks them first, so the contrast can demote EOS but never
# promote it past a token the expert prefers (EOS-first 50% -> 5%, greedy's own rate). "allow" is the
# papers' rule; "forbid" is the default.
EOS_PROMOTION_CHOICES = ("allow", "forbid")
DEFAULT_EOS_PROMOTION = "forbid"
EOS_PROMOTION_HELP = (
    "allow (the papers' rule) or forbid: EOS keeps a score only where the expert ranks it first, so the "
    "contrast never promotes it past a token the expert prefers"
)
DEFAULTS: dict[str, Any] = {
    "alpha": DEFAULT_ALPHA,
    "beta": DEFAULT_BETA,
    "amateur_temperature": DEFAULT_AMATEUR_TEMPERATURE,
    "cd_formulation": DEFAULT_FORMULATION,
    "cid_lambda": DEFAULT_CID_LAMBDA,
}


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:  # also numpy and torch scalars
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_alpha(alpha: Any) -> float:
    """The plausibility threshold alpha keeps tokens with p >= alpha * max p; it must be in (0, 1]."""
    alpha = _number("alpha (plausibility threshold)", alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha (plausibility threshold) must be in (0, 1], got {alpha}")
    return alpha


# Sanity bounds, far outside any useful setting, that keep every score finite in float32: a weight of
# 1e308 or a temperature of 1e-300 turns the scores into inf/nan (the vLLM server met both).
MAX_WEIGHT = 100.0
TEMPERATURE_RANGE = (0.01, 100.0)


def check_weight(name: str, value: Any) -> float:
    """A contrast strength (beta, lambda): in [0, MAX_WEIGHT] (0 switches the contrast off)."""
    value = _number(name, value)
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_WEIGHT:
        raise ValueError(f"{name} must be <= {MAX_WEIGHT:g}, got {value:g}")
    return value


def check_temperature(name: str, value: Any) -> float:
    """A softmax temperature in TEMPERATURE_RANGE (near 0 the scores overflow; near inf they flatten)."""
    value = _number(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
    return value


def check_eos_promotion(value: Any) -> str:
    if value not in EOS_PROMOTION_CHOICES:
        raise ValueError(f"eos_promotion must be one of {EOS_PROMOTION_CHOICES}, got {value!r}")
    return value


def check_formulation(formulation: Any) -> str:
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown contrastive decoding formulation {formulation!r}; choose one of {FORMULATIONS}")
    return formulation


def unused_hyperparameters(method: str, hyperparameters: Mapping[str, Any]) -> tuple[str, ...]:
    """Names the rule of ``method`` ("cd"/"cid") ignores under these settings: Li's CD form has no beta.

    A value given for one of them would be recorded in results while changing nothing, so callers that
    know which values the user *gave* (the registry, the vLLM request parser) refuse them.
    """
    formulation = hyperparameters.get("cd_formulation", DEFAULT_FORMULATION)
    return ("beta",) if method == "cd" and formulation == "li" else ()


def unused_message(name: str) -> str:
    """The one-line refusal for a given hyperparameter that :func:`unused_hyperparameters` lists."""
    if name == "beta":
        return (
            "beta is not used by contrastive decoding's li formulation (lp_e - lp_a, weight 1); "
            "drop it, or choose cd_formulation obrien-lewis, whose weight it is"
        )
    return f"{name} is not used with these settings"


@dataclass(frozen=True)
class ContrastSettings:
    """One validated contrast rule: ``apply(expert_scores, other_logits)`` gives the contrastive scores.

    Attributes:
        formulation: ``"li"``: ``lp_e - weight * lp_o``; ``"obrien-lewis"``:
            ``(1 + weight) * lp_e - weight * lp_o`` (on the plausible set; -inf elsewhere).
        alpha: plausibility threshold in (0, 1] on the expert's distribution.
        weight: beta (O'Brien-Lewis CD), 1 (Li CD) or lambda (CID); >= 0.
        other_temperature: tau > 0; the other side's log-probs are ``log_softmax(logits / tau)``.
        special_ids: token ids (EOS) the contrast may not promote: they keep a finite score only in rows
            where the expert ranks them first (see ``DEFAULT_EOS_PROMOTION``). Empty: the papers' rule.

    Build it with :meth:`for_cd` / :meth:`for_cid` (which apply each method's weight rule) or
    :meth:`from_hyperparameters` (registry and vLLM names). Invalid values raise ``ValueError``.
    """

    formulation: str = DEFAULT_FORMULATION
    alpha: float = DEFAULT_ALPHA
    weight: float = DEFAULT_BETA
    other_temperature: float = DEFAULT_AMATEUR_TEMPERATURE
    special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "formulation", check_formulation(self.formulation))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "weight", check_weight("weight", self.weight))
        object.__setattr__(self, "other_temperature", check_temperature("temperature", self.other_temperature))
        ids = tuple(self.special_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"special_ids must be non-negative token ids, got {ids!r}")
        object.__setattr__(self, "special_ids", tuple(sorted(set(ids))))

    def forbidding_promotion_of(self, special_ids: Sequence[int]) -> "ContrastSettings":
        """The same rule, where ``special_ids`` keep a score only in rows whose expert argmax they are."""
        return replace(self, special_ids=tuple(special_ids))

    @classmethod
    def for_cd(
        cls,
        *,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        formulation: str = DEFAULT_FORMULATION,
        amateur_temperature: float = DEFAULT_AMATEUR_TEMPERATURE,
    ) -> "ContrastSettings":
        """Contrastive decoding: expert vs amateur. ``beta`` is validated even where Li's form ignores it."""
        beta = check_weight("beta", beta)
        amateur_temperature = check_temperature("amateur_temperature", amateur_temperature)
        weight = LI_CD_WEIGHT if check_formulation(formulation) == "li" else beta
        return cls(formulation, alpha, weight, amateur_temperature)

    @classmethod
    def for_cid(cls, *, alpha: float = DEFAULT_ALPHA, cid_lambda: float = DEFAULT_CID_LAMBDA) -> "ContrastSettings":
        """Contrastive input decoding: ``lp(v | x) - lambda * lp(v | x')`` (Li's form, weight lambda)."""
        return cls("li", alpha, check_weight("lambda (cid_lambda)", cid_lambda), 1.0)

    @classmethod
    def from_hyperparameters(cls, method: str, hyperparameters: Mapping[str, Any]) -> "ContrastSettings":
        """From the names the registry, the CLI and vLLM requests use (missing names take defaults).

        Names that are not contrast hyperparameters (``num_beams``, ...) are ignored; ``method`` is
        ``"cd"`` (:data:`CD_HYPERPARAMETERS`) or ``"cid"`` (:data:`CID_HYPERPARAMETERS`).
        """
        values = {**DEFAULTS, **{k: v for k, v in hyperparameters.items() if k in DEFAULTS}}
        if method == "cd":
            return cls.for_cd(
                alpha=values["alpha"],
                beta=values["beta"],
                formulation=values["cd_formulation"],
                amateur_temperature=values["amateur_temperature"],
            )
        if method == "cid":
            return cls.for_cid(alpha=values["alpha"], cid_lambda=values["cid_lambda"])
        raise ValueError(f"contrast settings exist for methods 'cd' and 'cid', not {method!r}")

    @property
    def is_identity_contrast(self) -> bool:
        """Weight 0: the scores are the expert's log-probs on the plausible set; the other side is unused."""
        return self.weight == 0.0

    def apply(self, expert_scores: "torch.Tensor", other_logits: "torch.Tensor") -> "torch.Tensor":
        """Contrastive scores shaped like ``expert_scores`` (see :func:`contrast`)."""
        return contrast(
            expert_scores,
            other_logits,
            alpha=self.alpha,
            weight=self.weight,
            formulation=self.formulation,
            other_temperature=self.other_temperature,
            special_ids=self.special_ids,
        )


@dataclass(frozen=True)
class ScoringRule:
    """How a decoding method scores a fixed continuation in log-likelihood tasks.

    ``score = expert_ll - weight * contrast_ll`` where the contrast log-likelihood comes from
    ``contrast``: None (plain log-likelihood, what greedy/sampling/contrastive search use: they change
    which text is generated, not how a given text is scored), ``"amateur"`` (the same tokens under
    ``amateur``, contrastive decoding) or ``"contrastive-input"`` (the same continuation after the
    request's ``contrastive_context``, contrastive input decoding). Methods build their rule from their
    own hyperparameters (``DecodingMethod.scoring_rule``), so it lives here, next to the contrast rule
    it scores with, below both the method registry and the eval harness that use it.
    """

    name: str = "loglikelihood"
    contrast: str | None = None
    weight: float = 0.0
    amateur: Any = field(default=None, compare=False, repr=False)

    CONTRASTS: ClassVar[tuple[str | None, ...]] = (None, "amateur", "contrastive-input")

    def __post_init__(self):
        if self.contrast not in self.CONTRASTS:
            raise ValueError(f"unknown contrast {self.contrast!r}; choose one of {self.CONTRASTS}")
        if self.contrast == "amateur" and self.amateur is None:
            raise ValueError(f"scoring rule {self.name!r} contrasts with an amateur but has none")

    def combine(self, expert: Sequence[float], other: Sequence[float] | None) -> list[float]:
        if self.contrast is None:
            return list(expert)
        if other is None or len(other) != len(expert):
            raise ValueError(f"scoring rule {self.name!r} needs one contrast log-likelihood per continuation")
        return [e - self.weight * o for e, o in zip(expert, other)]

    def describe(self) -> dict:
        """The results-file record (also part of the run signature)."""
        if self.contrast is None:
            return {"scoring": self.name}
        other = {"amateur": "amateur_ll", "contrastive-input": "ll(continuation | contrastive context)"}[self.contrast]
        return {"scoring": self.name, "beta": float(self.weight), "formula": f"expert_ll - beta * {other}"}


PLAIN_LOGLIKELIHOOD = ScoringRule()


def plausible_mask(expert_log_probs: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """V_head: tokens with p_exp(v) >= alpha * max_w p_exp(w), i.e. log p >= log(alpha) + max log p.

    On logits this is the same set as O'Brien & Lewis's ``logit >= log(alpha) + max logit``, because
    log-softmax only shifts a row by a constant. The argmax token is always in the set.

    >>> import torch
    >>> plausible_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), alpha=0.5)
    tensor([[ True,  True, False, False]])
    """
    cutoff = expert_log_probs.max(dim=-1, keepdim=True).values + math.log(alpha)
    return expert_log_probs >= cutoff


def contrast(
    expert_scores: "torch.Tensor",
    other_logits: "torch.Tensor",
    *,
    alpha: float,
    weight: float,
    formulation: str,
    other_temperature: float = 1.0,
    special_ids: Sequence[int] = (),
) -> "torch.Tensor":
    """Contrastive scores, shaped like ``expert_scores``; -inf outside the plausible set.

    Prefer :meth:`ContrastSettings.apply`, which validates the hyperparameters once.

    Args:
        expert_scores: (rows, V_e) expert logits or log-probs (generate() passes log-probs under
            beam search and logits otherwise; both give the same result, see below).
        other_logits: (rows, V_o) logits of the amateur (CD) or of the contrastive input (CID).
        weight: beta for the O'Brien-Lewis form, lambda for the Li form / contrastive input decoding.
        formulation: ``"li"``: ``log p_exp - weight * log p_other`` (Li et al. 2022 use weight 1);
            ``"obrien-lewis"``: ``(1 + weight) * log p_exp - weight * log p_other``.
        other_temperature: tau; ``p_other`` is ``softmax(other_logits / tau)``.
        special_ids: ids (EOS) kept in the plausible set only in rows where they are the expert's argmax.

    Both distributions are log-softmax normalised before contrasting. O'Brien & Lewis write their
    rule on raw logits; per row that differs from ours only by a constant, so greedy choices and
    sampling probabilities are identical, while beam search (which sums scores *across* rows) gets
    a well-defined per-token score instead of one shifted by each row's arbitrary logit offset.

    Only ids both sides score (``min(V_e, V_o)``) are contrasted; larger expert ids get -inf. The
    plausible set is taken over that common range, so every row keeps at least one finite score.

    >>> import torch
    >>> expert = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> amateur = torch.log(torch.tensor([[0.6, 0.1, 0.2, 0.1]]))
    >>> contrast(expert, amateur, alpha=0.5, weight=1.0, formulation="li")  # log(.5/.6), log(.3/.1)
    tensor([[-0.1823,  1.0986,    -inf,    -inf]])
    """
    import torch

    vocab = min(expert_scores.shape[-1], other_logits.shape[-1])
    expert_lp = torch.log_softmax(expert_scores[:, :vocab].float(), dim=-1)
    other = other_logits[:, :vocab].to(device=expert_scores.device, dtype=torch.float32)
    if other_temperature != 1.0:
        other = other / other_temperature
    other_lp = torch.log_softmax(other, dim=-1)
    if weight == 0.0:  # also avoids 0 * -inf = nan where the other side rules a token out
        scores = expert_lp
    elif formulation == "li":
        scores = expert_lp - weight * other_lp if weight != 1.0 else expert_lp - other_lp
    else:
        scores = (1.0 + weight) * expert_lp - weight * other_lp
    keep = plausible_mask(expert_lp, alpha)
    special = [i for i in special_ids if i < vocab]
    if special:  # the contrast may demote these ids but never promote them past the expert's first choice
        is_special = torch.zeros(vocab, dtype=torch.bool, device=keep.device)
        is_special[special] = True
        is_first = torch.zeros_like(keep).scatter_(1, expert_lp.argmax(-1, keepdim=True), True)
        keep = keep & (~is_special | is_first)
    out = torch.full_like(expert_scores, -math.inf, dtype=torch.float32)
    out[:, :vocab] = scores.masked_fill(~keep, -math.inf)
    return out.to(expert_scores.dtype)
