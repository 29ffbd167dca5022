"""PPO for causal LMs with LoRA, built from transformers/PEFT pieces (TRL 1.16 no longer ships a PPOTrainer).

One iteration: sample one response per prompt with ``generate`` -> score with the reward function
(e.g. a :class:`~cdlm.alignment.rewards.ContrastiveReward`) -> per-token rewards ``-kl_coef * KL``
against the frozen reference (the base model with the LoRA adapter disabled) plus the score on the
last token -> GAE with a value head (a linear critic on the policy's last hidden state) -> whitened
advantages -> ``ppo_epochs`` passes of shuffled minibatches with the clipped policy and value losses.
The pure maths lives in ``ppo_core.py``.

Checkpoints hold the trainable weights (LoRA + value head), the optimiser, the step and the log;
sampling and data order are seeded by step, so resuming reproduces an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cdlm.alignment import ppo_core as core
from cdlm.alignment.rewards import ContrastiveReward, RewardFunction, check_rewards
from cdlm.alignment.rollout import Rollout, prompt_text, render_prompts, sample_responses


@dataclass
class PPOConfig:
    """Hyperparameters of :class:`PPOTrainer` (names follow the old TRL ``PPOConfig`` where one existed)."""

    output_dir: str = "ppo-output"
    num_iterations: int = 10  # rollout + update rounds
    rollout_batch_size: int = 8  # prompts (= responses) per rollout
    mini_batch_size: int = 4  # responses per gradient step
    ppo_epochs: int = 2  # passes over each rollout batch
    learning_rate: float = 5e-5
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None  # subtracted from the score of responses without EOS
    detach_value_head: bool = False  # True: the critic is a probe on frozen policy features
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    use_chat_template: bool = True
    seed: int = 0
    save_steps: int = 0  # 0: save only at the end
    logging_steps: int = 1

    def __post_init__(self) -> None:
        positive = ("num_iterations", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for PPO sampling, got {self.temperature}")
        if self.kl_estimator not in core.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {core.KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.whiten_advantages and self.rollout_batch_size < 2:
            raise ValueError("whitened advantages need rollout_batch_size >= 2")


# The Shen et al. (2024) setting is plain PPO with a ContrastiveReward; the alias names it.
ContrastivePPOConfig = PPOConfig


class ValueHead(nn.Module):
    """The critic: one linear layer on the policy's last hidden state, zero-initialised (V = 0 at start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


def _rows(dataset: Any) -> list[dict[str, Any]]:
    if dataset is None or len(dataset) == 0:
        raise ValueError("train_dataset must hold at least one prompt")
    rows = [dict(row) if isinstance(row, Mapping) else {"prompt": row} for row in dataset]
    if any("prompt" not in row for row in rows):
        raise ValueError("every dataset row needs a 'prompt' column")
    return rows


class PPOTrainer:
    """PPO with a LoRA policy, a value head and an adapter-disabled reference.

    Args:
        model: a causal LM. With ``peft_config`` it is wrapped in a PEFT model (only LoRA + value
            head train; the reference is the same model with the adapter disabled). A model that is
            already a ``PeftModel`` is used as is. Without PEFT the whole model trains and a frozen
            deep copy is the reference.
        args: :class:`PPOConfig`.
        processing_class: the tokenizer (left padding, pad token set).
        reward_funcs: a reward callable ``(prompts, completions, **columns) -> list[float]``.
        train_dataset: prompts as strings, or rows with a ``prompt`` column; other columns are
            passed to the reward function (e.g. ``answer``).
    """

    def __init__(
        self,
        model: nn.Module,
        args: PPOConfig,
        processing_class,
        reward_funcs: RewardFunction,
        train_dataset: Sequence[Any],
        peft_config=None,
        callbacks: Sequence[Callable[[dict[str, float]], None]] = (),
    ):
        if reward_funcs is None:
            raise ValueError("PPOTrainer needs a reward function or reward model (reward_funcs)")
        if isinstance(reward_funcs, nn.Module):
            raise ValueError("wrap a reward model in cdlm.alignment.rewards.SequenceClassificationReward(model, tokenizer)")
        if processing_class.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.args, self.tokenizer, self.reward = args, processing_class, reward_funcs
        self.rows = _rows(train_dataset)
        self.callbacks = list(callbacks)
        torch.manual_seed(args.seed)
        from peft import PeftModel, get_peft_model

        if peft_config is not None:
            if isinstance(model, PeftModel):
                raise ValueError("model is already a PeftModel; do not pass peft_config too")
            model = get_peft_model(model, peft_config)
        self.is_peft = isinstance(model, PeftModel)
        self.model = model
        self.ref_model = None
        if not self.is_peft:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(model.parameters()).device
        self.value_head = ValueHead(model.config.get_text_config().hidden_size).to(device)
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=args.learning_rate)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # -- parameters and forward passes --------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = {"policy." + n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        state.update({"value_head." + n: p.detach().clone() for n, p in self.value_head.named_parameters()})
        return state

    @contextmanager
    def _reference(self):
        if self.is_peft:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.ref_model

    def _forward(self, model: nn.Module, rollout: Rollout, index: torch.Tensor | slice, with_values: bool):
        """Log-probs of the response tokens (at the sampling temperature), entropies and values."""
        input_ids = rollout.input_ids[index]
        attention_mask = rollout.attention_mask[index]
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        prompt_length = rollout.prompt_ids.shape[1]
        response_ids = rollout.response_ids[index]
        output = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=with_values, use_cache=False,
        )
        # Position t predicts token t+1: the response logits start one before the response.
        logits = output.logits[:, prompt_length - 1 : -1].float() / self.args.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        entropy = core.entropy_from_logits(logits.detach())
        values = None
        if with_values:
            hidden = output.hidden_states[-1][:, prompt_length - 1 : -1]
            if self.args.detach_value_head:
                hidden = hidden.detach()
            values = self.value_head(hidden)
        return logprobs, entropy, values

    # -- one PPO iteration ------------------------------------------------------------------

    def _batch_rows(self, step: int) -> list[dict[str, Any]]:
        """Rows for rollout ``step``: epochs over a seeded shuffle, so the order depends only on (seed, step)."""
        size, count = self.args.rollout_batch_size, len(self.rows)
        rows = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.args.seed + epoch)).tolist()
            rows.append(self.rows[order[offset]])
        return rows

    def _score(self, rows: list[dict[str, Any]], texts: list[str]) -> tuple[torch.Tensor, list[float] | None]:
        prompts = [prompt_text(row["prompt"]) for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        scores = check_rewards(self.reward(prompts, texts, **columns), len(texts), getattr(self.reward, "__name__", "reward"))
        raw = list(self.reward.last_raw_rewards) if isinstance(self.reward, ContrastiveReward) else None
        return torch.tensor(scores), raw

    def rollout_step(self) -> dict[str, float]:
        """Sample, score and run the PPO updates of one iteration; returns its statistics."""
        args, started = self.args, time.perf_counter()
        rows = self._batch_rows(self.step)
        rendered = render_prompts(self.tokenizer, [prompt_text(r["prompt"]) for r in rows], args.use_chat_template)
        torch.manual_seed(args.seed * 1_000_003 + self.step)
        rollout = sample_responses(
            self.model, self.tokenizer, rendered, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        )
        scores, raw_scores = self._score(rows, rollout.texts)
        device = rollout.response_ids.device
        scores = scores.to(device)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~rollout.ended).float()
        mask = rollout.response_mask.float()

        self.model.eval()  # no dropout while computing the "old" quantities
        with torch.no_grad():
            old_logprobs, _, old_values = self._forward(self.model, rollout, slice(None), with_values=True)
            with self._reference() as reference:
                ref_logprobs, _, _ = self._forward(reference, rollout, slice(None), with_values=False)
        kl = core.kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask
        rewards = core.per_token_rewards(scores, kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = core.whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, old_values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = core.whiten(advantages, mask)

        self.model.train()
        stats: dict[str, list[float]] = {}
        batch = rollout.response_ids.shape[0]
        generator = torch.Generator().manual_seed(args.seed * 7_919 + self.step)
        for _ in range(args.ppo_epochs):
            order = torch.randperm(batch, generator=generator)
            for start in range(0, batch, args.mini_batch_size):
                index = order[start : start + args.mini_batch_size].to(device)
                logprobs, entropy, values = self._forward(self.model, rollout, index, with_values=True)
                mb_mask = mask[index]
                pg_loss, pg_stats = core.clipped_policy_loss(logprobs, old_logprobs[index], advantages[index], mb_mask, args.cliprange)
                vf_loss, vf_stats = core.clipped_value_loss(values, old_values[index], returns[index], mb_mask, args.cliprange_value)
                loss = pg_loss + args.vf_coef * vf_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), args.max_grad_norm)
                self.optimizer.step()
                for name, value in {
                    "loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": core.masked_mean(entropy, mb_mask),
                    "policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"],
                    "value/clipfrac": vf_stats["vf_clipfrac"], "grad_norm": grad_norm,
                }.items():
                    stats.setdefault(name, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))
        self.step += 1
        record = {name: sum(values) / len(values) for name, values in stats.items()}
        record.update({
            "step": float(self.step),
            "score": float(scores.mean()),
            "reward_raw": float(sum(raw_scores) / len(raw_scores)) if raw_scores is not None else float(scores.mean()),
            "kl": float((core.kl_penalty(old_logprobs, ref_logprobs, "k1") * mask).sum(dim=1).mean()),
            "non_score_reward": float((-args.kl_coef * kl).sum(dim=1).mean()),
            "value/mean": float(core.masked_mean(old_values, mask)),
            "response_length": float(mask.sum(dim=1).mean()),
            "eos_fraction": float(rollout.ended.float().mean()),
            "seconds": time.perf_counter() - started,
        })
        return record

    # -- training loop, checkpoints, evaluation -----------------------------------------------

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> list[dict[str, float]]:
        """Run until ``num_iterations`` rollouts are done; returns the per-iteration log."""
        if resume_from_checkpoint:
            path = self.latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                raise FileNotFoundError(f"no checkpoint-* folder in {self.args.output_dir} to resume from")
            self.load_checkpoint(path)
        while self.step < self.args.num_iterations:
            record = self.rollout_step()
            self.history.append(record)
            for callback in self.callbacks:
                callback(record)
            if self.args.save_steps and self.step % self.args.save_steps == 0:
                self.save_checkpoint()
        self.save_checkpoint()
        return self.history

    def latest_checkpoint(self) -> Path | None:
        folders = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return folders[-1] if folders else None

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or Path(self.args.output_dir) / f"checkpoint-{self.step}")
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self._trainable_state(), path / "trainable.pt")
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        if self.is_peft:
            self.model.save_pretrained(str(path / "adapter"))
        state = {"step": self.step, "history": self.history, "config": asdict(self.args)}
        (path / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{path} is not a PPO checkpoint (no trainer_state.json)")
        state = torch.load(path / "trainable.pt", map_location="cpu")
        params = dict(("policy." + n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        params.update(("value_head." + n, p) for n, p in self.value_head.named_parameters())
        if set(state) != set(params):
            raise ValueError(f"checkpoint {path} does not match this model's trainable parameters")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
        saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        self.step, self.history = int(saved["step"]), list(saved["history"])

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[Any], reward: RewardFunction | None = None, batch_size: int = 16, do_sample: bool = False) -> list[float]:
        """Rewards of the current policy's responses (greedy by default) on held-out prompts."""
        reward = reward or self.reward
        rows = _rows(dataset)
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [prompt_text(r["prompt"]) for r in chunk]
            rendered = render_prompts(self.tokenizer, prompts, self.args.use_chat_template)
            rollout = sample_responses(
                self.model, self.tokenizer, rendered, max_new_tokens=self.args.max_new_tokens, do_sample=do_sample,
                temperature=self.args.temperature, top_k=self.args.top_k, top_p=self.args.top_p,
            )
            columns = {key: [row[key] for row in chunk] for key in chunk[0] if key != "prompt"}
            scores += check_rewards(reward(prompts, rollout.texts, **columns), len(chunk), "reward")
        return scores
