"""Reward functions for RL: rule-based (verifiable arithmetic), a sequence-classification reward model
(trained with :mod:`cdlm.alignment.rl.reward_model`), and ``ContrastiveReward`` (Shen et al., 2024).

Every reward here has TRL's reward-function signature, ``reward(prompts, completions, **kwargs) ->
list[float]`` (extra dataset columns such as ``answer`` arrive as keyword lists), so each one works
both with :class:`cdlm.alignment.rl.trainer.ContrastivePPOTrainer` and as a ``reward_funcs`` entry of TRL's
``GRPOTrainer``/``RLOOTrainer``.

Contrastive rewards: ``r_CR(x, y) = r(x, y) - agg_i r(x, y_i)`` where ``y_1..y_k`` are responses
sampled offline from the initial policy (see ``baselines.py``). The subtracted term is a per-prompt
constant, so in GRPO/RLOO (whose advantages already subtract the group mean / leave-one-out mean) it
cancels exactly; it only changes learning where the baseline is a learned critic, i.e. PPO.
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cdlm.alignment.rl.rollout import completion_text, prompt_text

AGGREGATES: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": statistics.fmean,
    "median": statistics.median,
    "max": max,
}

# Keyword arguments TRL's GRPOTrainer/RLOOTrainer add to every reward call; seeing them means the
# reward is being used with a group baseline, where a per-prompt constant has no effect.
_TRL_GROUP_TRAINER_KWARGS = ("trainer_state", "log_metric", "log_extra")


class RewardFunction(Protocol):
    """TRL's reward-function protocol: one float per (prompt, completion) pair."""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]: ...


def check_rewards(rewards: Sequence[float], expected: int, name: str = "reward") -> list[float]:
    """Reject wrong lengths and NaN/inf rewards with a message naming the culprit."""
    rewards = [float(r) for r in rewards]
    if len(rewards) != expected:
        raise ValueError(f"{name} returned {len(rewards)} rewards for {expected} completions")
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"{name} returned non-finite rewards (NaN/inf) at positions {bad[:10]}")
    return rewards


# ---------------------------------------------------------------------------------------------
# Rule-based reward: verifiable arithmetic answers (GSM8K style).

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_number(text: str) -> float | None:
    """The answer a completion commits to: the number after ``####`` if present, else the last number."""
    if "####" in text:
        text = text.split("####")[-1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


class GSM8KReward:
    """1.0 when the completion's final number equals the reference answer, else 0.0.

    References come from an ``answer`` keyword column (as TRL passes dataset columns) or from the
    ``answers`` mapping (prompt text -> answer) given at construction. A GSM8K solution string such
    as ``"... #### 72"`` is accepted as a reference. ``format_reward`` is added when the completion
    contains any number at all (a small shaping term; 0 by default).
    """

    __name__ = "gsm8k_reward"

    def __init__(
        self,
        answers: Mapping[str, Any] | None = None,
        correct: float = 1.0,
        incorrect: float = 0.0,
        format_reward: float = 0.0,
    ):
        self.answers = dict(answers or {})
        self.correct, self.incorrect, self.format_reward = correct, incorrect, format_reward

    def _reference(self, prompt: Any, index: int, answer: Sequence[Any] | None) -> float:
        if answer is not None:
            reference = answer[index]
        else:
            key = prompt_text(prompt)
            if key not in self.answers:
                raise ValueError(
                    f"no reference answer for prompt {key[:60]!r}: pass an 'answer' column or "
                    "answers={prompt: answer}"
                )
            reference = self.answers[key]
        value = extract_final_number(str(reference)) if not isinstance(reference, (int, float)) else float(reference)
        if value is None:
            raise ValueError(f"reference answer {reference!r} contains no number")
        return value

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        rewards = []
        for index, (prompt, completion) in enumerate(zip(prompts, completions)):
            predicted = extract_final_number(completion_text(completion))
            reference = self._reference(prompt, index, answer)
            is_correct = predicted is not None and math.isclose(predicted, reference, rel_tol=0.0, abs_tol=1e-6)
            reward = self.correct if is_correct else self.incorrect
            if predicted is not None:
                reward += self.format_reward
            rewards.append(reward)
        return rewards


RULE_REWARDS: dict[str, Callable[[], RewardFunction]] = {"gsm8k": GSM8KReward}


# ---------------------------------------------------------------------------------------------
# Learned reward model (sequence classification with one output).


class SequenceClassificationReward:
    """Scores (prompt, completion) pairs with a ``*ForSequenceClassification`` model (``num_labels=1``).

    The pair is rendered as a user/assistant chat when the tokenizer has a template (as TRL's
    ``RewardTrainer`` renders conversational preference data), else as ``prompt + completion``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 8,
        max_length: int = 1024,
        use_chat_template: bool = True,
    ):
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a reward model must have a single output (num_labels=1), this one has {num_labels}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the reward model's tokenizer needs a pad token")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.use_chat_template = batch_size, max_length, use_chat_template
        self.__name__ = "reward_model"

    def _render(self, prompt: Any, completion: Any) -> str:
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "user", "content": prompt_text(prompt)},
                {"role": "assistant", "content": completion_text(completion)},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt_text(prompt) + completion_text(completion)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = [self._render(p, c) for p, c in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return check_rewards(scores, len(texts), "reward model")


def load_reward(spec: str, *, device: str | torch.device = "cpu", batch_size: int = 8) -> RewardFunction:
    """``rule:<name>`` for a rule-based reward, or a folder holding a sequence-classification reward model
    (a full model, or a PEFT adapter saved by :func:`train_reward_model`)."""
    if spec.startswith("rule:"):
        name = spec.split(":", 1)[1]
        if name not in RULE_REWARDS:
            raise ValueError(f"unknown rule reward {name!r}; available: {', '.join(sorted(RULE_REWARDS))}")
        return RULE_REWARDS[name]()
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"reward model {spec!r} not found: give 'rule:gsm8k' or a folder with a sequence-classification model"
        )
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return SequenceClassificationReward(model.to(device), tokenizer, batch_size=batch_size)


def reward_identity(reward: RewardFunction) -> str:
    """What scored a set of rewards, for caches that store them: the rule and its settings, or the model's weights."""
    from cdlm.run_identity import weights_fingerprint

    if isinstance(reward, GSM8KReward):
        return (
            f"rule:gsm8k(correct={reward.correct}, incorrect={reward.incorrect}, format={reward.format_reward}, "
            f"answers={len(reward.answers)})"
        )
    if isinstance(reward, SequenceClassificationReward):
        return (
            f"reward_model:{weights_fingerprint(reward.model)}(max_length={reward.max_length}, "
            f"chat={reward.use_chat_template})"
        )
    module = getattr(reward, "__module__", None) or type(reward).__module__
    return f"{module}.{getattr(reward, '__qualname__', type(reward).__qualname__)}"


# ---------------------------------------------------------------------------------------------
# Contrastive rewards.


class ContrastiveReward:
    """``r(x, y) - aggregate(baseline rewards of x)`` with optional running normalisation and clipping.

    ``baselines`` maps a prompt's text to the rewards of its ``k`` offline baseline responses: a
    :class:`cdlm.alignment.rl.baselines.BaselineCache`, a :class:`~cdlm.alignment.rl.baselines.LazyBaselines`
    (which :class:`~cdlm.alignment.rl.trainer.ContrastivePPOTrainer` fills for each iteration's prompts) or any
    mapping.
    ``aggregate`` is ``"mean"`` (the paper's choice), ``"median"`` or ``"max"`` (compare against the best
    baseline). With
    ``normalize=True`` the contrastive rewards are divided by the running standard deviation of all
    contrastive rewards seen so far (keeps the scale stable as the policy improves); ``clip`` then
    clamps them to ``[-clip, clip]``. The raw rewards of the last call are kept in ``last_raw_rewards``.
    """

    def __init__(
        self,
        reward: RewardFunction,
        baselines: Mapping[str, Sequence[float]],
        aggregate: str = "mean",
        normalize: bool = False,
        clip: float | None = None,
    ):
        if reward is None:
            raise ValueError("ContrastiveReward needs a reward function or reward model, got None")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.reward, self.baselines, self.aggregate = reward, baselines, aggregate
        self.normalize, self.clip = normalize, clip
        self.last_raw_rewards: list[float] = []
        self._count, self._mean, self._m2 = 0, 0.0, 0.0
        self._warned = False
        self.__name__ = "contrastive_" + getattr(reward, "__name__", type(reward).__name__)

    def baseline(self, prompt: Any) -> float:
        """The aggregated baseline reward of one prompt."""
        key = prompt_text(prompt)
        try:
            values = self.baselines[key]
        except KeyError:
            raise ValueError(
                f"prompt {key[:60]!r} has no baseline cache entry; run the offline baseline step "
                "(cdlm.alignment.rl.baselines.generate_baselines) on every training prompt first"
            ) from None
        values = check_rewards(values, len(values), "baseline cache")
        if not values:
            raise ValueError(f"prompt {key[:60]!r} has an empty baseline entry")
        return float(AGGREGATES[self.aggregate](values))

    def warn_no_effect(self, where: str = "GRPO/RLOO") -> None:
        if not self._warned:
            warnings.warn(
                f"ContrastiveReward has no effect with {where}: the per-prompt baseline is a constant that the group "
                "mean / leave-one-out baseline of the advantage cancels exactly. "
                "Use it with ContrastivePPOTrainer (learned critic).",
                UserWarning,
                stacklevel=3,
            )
            self._warned = True

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if any(name in kwargs for name in _TRL_GROUP_TRAINER_KWARGS):
            self.warn_no_effect()
        raw = check_rewards(
            self.reward(prompts, completions, **kwargs), len(completions), getattr(self.reward, "__name__", "reward")
        )
        return self.contrast(prompts, raw)

    def contrast(self, prompts: Sequence[Any], raw: Sequence[float]) -> list[float]:
        """The contrastive rewards of already computed raw rewards (updates the running normalisation).

        Data-parallel PPO scores each process's responses with the raw reward, gathers the raw rewards and
        calls this on the whole batch in every process, so the running statistics stay identical everywhere.
        """
        raw = list(raw)
        self.last_raw_rewards = raw
        contrastive = [r - self.baseline(p) for r, p in zip(raw, prompts)]
        if self.normalize:
            for value in contrastive:  # Welford's running variance
                self._count += 1
                delta = value - self._mean
                self._mean += delta / self._count
                self._m2 += delta * (value - self._mean)
            std = math.sqrt(self._m2 / (self._count - 1)) if self._count > 1 else 1.0
            contrastive = [value / max(std, 1e-6) for value in contrastive]
        if self.clip is not None:
            contrastive = [min(max(value, -self.clip), self.clip) for value in contrastive]
        return contrastive


def as_trl_reward_func(reward: RewardFunction, trainer: str = "GRPO/RLOO") -> Callable[..., list[float]]:
    """Adapt a cdlm reward for TRL's ``GRPOTrainer``/``RLOOTrainer`` (``reward_funcs=[...]``).

    The signatures already match; this gives the function a ``__name__`` for TRL's logs and, for a
    :class:`ContrastiveReward`, warns now that the contrastive baseline cancels in group advantages.
    """
    if isinstance(reward, ContrastiveReward):
        reward.warn_no_effect(trainer)

    def reward_func(prompts, completions, **kwargs):
        return reward(prompts, completions, **kwargs)

    reward_func.__name__ = getattr(reward, "__name__", type(reward).__name__)
    return reward_func
