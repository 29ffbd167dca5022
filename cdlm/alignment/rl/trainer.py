"""PPO for causal LMs with LoRA, from transformers/PEFT/accelerate pieces (TRL 1.16 no longer ships a PPO trainer).

One iteration: sample one response per prompt with ``generate`` -> score with the reward function
(e.g. a :class:`~cdlm.alignment.rl.rewards.ContrastiveReward`) -> per-token rewards ``-kl_coef * KL``
against the frozen reference (the base model with the LoRA adapter disabled) plus the score on the
last token -> GAE with a value head (a linear critic on the policy's last hidden state) -> whitened
advantages -> ``ppo_epochs`` passes of shuffled minibatches with the clipped policy and value losses.
The pure maths lives in ``core.py``, the hyperparameters in ``config.py``.

Data parallelism (``torchrun`` / ``accelerate launch``) goes through ``accelerate``: the policy and
value head are one prepared module (DDP all-reduces the gradients of both). Each process samples,
scores and runs the no-grad forwards of its share of the rollout; the rollout tensors, scores and
log-probs are then gathered, so KL, GAE, advantage whitening and every logged statistic are computed
on the whole batch, identically in every process. Each minibatch is split over the processes (and
gradient-accumulation steps) with losses normalised by the minibatch's global token count: the
update equals the one-process update on the same global batch. Sampling uses one seeded RNG per
(iteration, row) (:class:`~cdlm.alignment.rl.rollout.RowSeededSampling`), so the responses do not
depend on the number of processes either.

Checkpoints (written by the main process only) hold the trainable weights (LoRA + value head), the
optimiser, the step and the log; sampling and data order are seeded by step, so resuming
reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from cdlm.alignment.callbacks import StopOnNonFinite
from cdlm.alignment.checkpoints import checkpoints, last_complete_checkpoint
from cdlm.alignment.parallel import check_launch
from cdlm.alignment.rl import core
from cdlm.alignment.rl.config import ContrastivePPOConfig
from cdlm.alignment.rl.rewards import ContrastiveReward, RewardFunction, check_rewards
from cdlm.alignment.rl.rollout import Rollout, prompt_text, render_prompts, sample_responses
from cdlm.alignment.settings import without_secrets

__all__ = ["ContrastivePPOConfig", "ContrastivePPOTrainer", "ValueHead"]


class ValueHead(nn.Module):
    """The critic: one linear layer on the policy's last hidden state, zero-initialised (V = 0 at start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


class PolicyWithValue(nn.Module):
    """The policy and its critic as one module, so a data-parallel wrapper (DDP) syncs the gradients of both."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(
        self, input_ids, attention_mask, response_length: int, with_values: bool = True, detach_values: bool = False
    ):
        return response_outputs(
            self.policy,
            input_ids,
            attention_mask,
            response_length,
            value_head=self.value_head if with_values else None,
            detach_values=detach_values,
        )


def response_outputs(
    policy: nn.Module, input_ids, attention_mask, response_length: int, value_head=None, detach_values=False
):
    """``(logits, values)`` at the positions predicting the last ``response_length`` tokens (no head: values None)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    output = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=value_head is not None,
        use_cache=False,
        logits_to_keep=response_length + 1,
    )
    # Position t predicts token t+1: the response logits start one before the response.
    logits = output.logits[:, -(response_length + 1) : -1]
    if value_head is None:
        return logits, None
    hidden = output.hidden_states[-1][:, -(response_length + 1) : -1]
    return logits, value_head(hidden.detach() if detach_values else hidden).float()


def _rows(dataset: Any) -> list[dict[str, Any]]:
    if dataset is None or len(dataset) == 0:
        raise ValueError("train_dataset must hold at least one prompt")
    rows = [dict(row) if isinstance(row, Mapping) else {"prompt": row} for row in dataset]
    if any("prompt" not in row for row in rows):
        raise ValueError("every dataset row needs a 'prompt' column")
    return rows


def _row_seed(seed: int, step: int, row: int) -> int:
    return (seed * 1_000_003 + step) * 100_003 + row


class ContrastivePPOTrainer:
    """PPO with a LoRA policy, a value head and an adapter-disabled reference.

    Args:
        model: a causal LM. With ``peft_config`` it is wrapped in a PEFT model (only LoRA + value
            head train; the reference is the same model with the adapter disabled). A model that is
            already a ``PeftModel`` is used as is. Without PEFT the whole model trains and a frozen
            deep copy is the reference.
        args: :class:`~cdlm.alignment.rl.config.ContrastivePPOConfig`.
        processing_class: the tokenizer (left padding, pad token set).
        reward_funcs: a reward callable ``(prompts, completions, **columns) -> list[float]``. Each
            process scores its own share of the responses, so a reward must not depend on which
            other responses it sees (a :class:`ContrastiveReward`'s running normalisation is applied
            to the gathered batch, in every process alike).
        train_dataset: prompts as strings, or rows with a ``prompt`` column; other columns are
            passed to the reward function (e.g. ``answer``).
        callbacks: ``transformers.TrainerCallback`` objects (``on_log`` receives every logged record), or
            plain callables called with each iteration's record on the main process.
    """

    def __init__(
        self,
        model: nn.Module,
        args: ContrastivePPOConfig,
        processing_class,
        reward_funcs: RewardFunction,
        train_dataset: Sequence[Any],
        peft_config=None,
        callbacks: Sequence[TrainerCallback | Callable[[dict[str, float]], None]] = (),
    ):
        if not isinstance(args, ContrastivePPOConfig):
            raise TypeError(f"args must be a ContrastivePPOConfig, got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError("ContrastivePPOTrainer needs a reward function or reward model (reward_funcs)")
        if isinstance(reward_funcs, nn.Module):
            raise ValueError(
                "wrap a reward model in cdlm.alignment.rl.rewards.SequenceClassificationReward(model, tokenizer)"
            )
        if processing_class.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.args, self.tokenizer, self.reward = args, processing_class, reward_funcs
        self.rows = _rows(train_dataset)
        mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        # Gradient accumulation is done here (losses are normalised by global token counts), not by accelerate.
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=args.use_cpu)
        if self.accelerator.distributed_type not in (
            DistributedType.NO,
            DistributedType.MULTI_CPU,
            DistributedType.MULTI_GPU,
            DistributedType.MULTI_XPU,
            DistributedType.MULTI_NPU,
            DistributedType.MULTI_MLU,
            DistributedType.MULTI_MUSA,
        ):
            raise ValueError(
                f"ContrastivePPOTrainer runs data-parallel (DDP) only, not {self.accelerator.distributed_type.value}: "
                "rollouts generate with the full policy in every process. Launch with torchrun or a plain accelerate "
                "config."
            )
        check_launch(self.accelerator)
        args.check_processes(self.accelerator.num_processes)
        torch.manual_seed(args.seed)
        from peft import PeftModel, get_peft_model

        if peft_config is not None:
            if isinstance(model, PeftModel):
                raise ValueError("model is already a PeftModel; do not pass peft_config too")
            model = get_peft_model(model, peft_config)
        self.is_peft = isinstance(model, PeftModel)
        device = self.accelerator.device
        self.model = model.to(device)
        self.ref_model = None
        if not self.is_peft:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.value_head = ValueHead(model.config.get_text_config().hidden_size).to(device)
        module = PolicyWithValue(self.model, self.value_head)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.learning_rate)
        self.wrapped, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.step = 0
        self._saved_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.record_callbacks = [c for c in callbacks if not isinstance(c, TrainerCallback)]
        trainer_callbacks = [DefaultFlowCallback, *get_reporting_integration_callbacks(args.report_to)]
        trainer_callbacks.append(StopOnNonFinite((self.value_head,)))
        trainer_callbacks += [c for c in callbacks if isinstance(c, TrainerCallback)]
        self.callback_handler = CallbackHandler(trainer_callbacks, self.model, processing_class, self.optimizer, None)
        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()

    # -- parameters and forward passes --------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = {"policy." + n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        state.update({"value_head." + n: p.detach().clone() for n, p in self.value_head.named_parameters()})
        return state

    @contextlib.contextmanager
    def _reference(self):
        if self.is_peft:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.ref_model

    def _forward(self, model: nn.Module, rollout: Rollout, index: torch.Tensor | slice, with_values: bool):
        """Log-probs of the response tokens (at the sampling temperature), entropies and values.

        ``model`` is the policy (values come from the value head) or the reference (``with_values=False``);
        the training forward goes through the prepared module instead, see :meth:`_train_forward`.
        """
        response_ids = rollout.response_ids[index]
        logits, values = response_outputs(
            model,
            rollout.input_ids[index],
            rollout.attention_mask[index],
            response_ids.shape[1],
            value_head=self.value_head if with_values else None,
        )
        return self._logprobs_and_entropy(logits, response_ids) + (values,)

    def _train_forward(self, rollout: Rollout, index: torch.Tensor):
        response_ids = rollout.response_ids[index]
        logits, values = self.wrapped(
            rollout.input_ids[index],
            rollout.attention_mask[index],
            response_ids.shape[1],
            detach_values=self.args.detach_value_head,
        )
        return self._logprobs_and_entropy(logits, response_ids) + (values,)

    def _logprobs_and_entropy(self, logits: torch.Tensor, response_ids: torch.Tensor):
        logits = logits.float() / self.args.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        return logprobs, core.entropy_from_logits(logits.detach())

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

    def _local_share(self) -> slice:
        """This process's contiguous share of the global rollout batch."""
        share = self.args.rollout_batch_size // self.accelerator.num_processes
        return slice(self.accelerator.process_index * share, (self.accelerator.process_index + 1) * share)

    def _score(self, rows: list[dict[str, Any]], texts: list[str], all_rows: list[dict[str, Any]]):
        """Scores of the whole batch from this process's ``rows``/``texts``: ``(scores, raw scores or None)``."""
        prompts = [prompt_text(row["prompt"]) for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        contrastive = isinstance(self.reward, ContrastiveReward)
        reward = self.reward.reward if contrastive else self.reward
        local = check_rewards(reward(prompts, texts, **columns), len(texts), getattr(reward, "__name__", "reward"))
        gathered = self.accelerator.gather(torch.tensor(local, dtype=torch.float64, device=self.accelerator.device))
        raw = gathered.cpu().tolist()
        if not contrastive:
            return torch.tensor(raw, dtype=torch.float32), None
        scores = self.reward.contrast([prompt_text(row["prompt"]) for row in all_rows], raw)
        return torch.tensor(scores, dtype=torch.float32), raw

    def _gather_rollout(self, rollout: Rollout) -> Rollout:
        """The whole batch's rollout in every process, padded as one process would pad it."""
        accelerator, pad = self.accelerator, self.tokenizer.pad_token_id
        if accelerator.num_processes == 1:
            return rollout

        def gather(tensor, pad_index, pad_first):
            return accelerator.gather(
                accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_index, pad_first=pad_first)
            )

        texts = gather_object(list(rollout.texts))
        return Rollout(
            prompt_ids=gather(rollout.prompt_ids, pad, True),
            prompt_mask=gather(rollout.prompt_mask, 0, True),
            response_ids=gather(rollout.response_ids, pad, False),
            response_mask=gather(rollout.response_mask, 0, False),
            texts=list(texts),
            ended=accelerator.gather(rollout.ended),
        )

    def rollout_step(self) -> dict[str, float]:
        """Sample, score and run the PPO updates of one iteration; returns its statistics (equal in every process)."""
        args, accelerator, started = self.args, self.accelerator, time.perf_counter()
        rows = self._batch_rows(self.step)
        share = self._local_share()
        baselines = self.reward.baselines if isinstance(self.reward, ContrastiveReward) else None
        if baselines is not None and hasattr(baselines, "ensure"):
            # Lazy contrastive baselines: sampled from the initial policy (the reference) for this batch's prompts.
            with torch.no_grad(), self._reference() as reference:
                baselines.ensure(rows, reference)
        local_rows = rows[share]
        rendered = render_prompts(
            self.tokenizer, [prompt_text(r["prompt"]) for r in local_rows], args.use_chat_template
        )
        local = sample_responses(
            self.model,
            self.tokenizer,
            rendered,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            row_seeds=[_row_seed(args.seed, self.step, i) for i in range(share.start, share.stop)],
        )
        scores, raw_scores = self._score(local_rows, local.texts, rows)
        rollout = self._gather_rollout(local)
        device = rollout.response_ids.device
        scores = scores.to(device)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~rollout.ended).float()
        mask = rollout.response_mask.float()

        self.model.eval()  # no dropout while computing the "old" quantities
        # Each process computes its share, then every process holds the whole batch. Under the same autocast as
        # the prepared module's training forward (bf16/fp16), so the first ratio of each rollout is exactly 1.
        with torch.no_grad(), accelerator.autocast():
            old_logprobs, _, old_values = self._forward(self.model, rollout, share, with_values=True)
            with self._reference() as reference:
                ref_logprobs, _, _ = self._forward(reference, rollout, share, with_values=False)
            old_logprobs, old_values, ref_logprobs = accelerator.gather((old_logprobs, old_values, ref_logprobs))
        kl = core.kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask
        rewards = core.per_token_rewards(scores, kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = core.whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, old_values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = core.whiten(advantages, mask)

        self.model.train()
        names = (
            "loss/policy",
            "loss/value",
            "policy/entropy",
            "policy/clipfrac",
            "policy/approx_kl",
            "value/clipfrac",
        )
        stats: dict[str, list[float]] = {}
        batch = rollout.response_ids.shape[0]
        processes, rank = accelerator.num_processes, accelerator.process_index
        per_process = args.mini_batch_size // processes
        micro = per_process // args.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(args.seed * 7_919 + self.step)
        for _ in range(args.ppo_epochs):
            order = torch.randperm(batch, generator=generator)
            for start in range(0, batch, args.mini_batch_size):
                minibatch = order[start : start + args.mini_batch_size].to(device)
                # Token-mean losses over the whole minibatch: each part is weighted by its share of the tokens
                # (times the number of processes, which DDP's gradient averaging divides out again).
                total_tokens = mask[minibatch].sum().clamp(min=1.0)
                mine = minibatch[rank * per_process : (rank + 1) * per_process]
                sums = torch.zeros(len(names), device=device)
                for part in range(args.gradient_accumulation_steps):
                    index = mine[part * micro : (part + 1) * micro]
                    last = part == args.gradient_accumulation_steps - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(self.wrapped):
                        logprobs, entropy, values = self._train_forward(rollout, index)
                        mb_mask = mask[index]
                        weight = mb_mask.sum() / total_tokens
                        pg_loss, pg_stats = core.clipped_policy_loss(
                            logprobs, old_logprobs[index], advantages[index], mb_mask, args.cliprange
                        )
                        vf_loss, vf_stats = core.clipped_value_loss(
                            values, old_values[index], returns[index], mb_mask, args.cliprange_value
                        )
                        accelerator.backward((pg_loss + args.vf_coef * vf_loss) * weight * processes)
                    parts = (
                        pg_loss,
                        vf_loss,
                        core.masked_mean(entropy, mb_mask),
                        pg_stats["clipfrac"],
                        pg_stats["approx_kl"],
                        vf_stats["vf_clipfrac"],
                    )
                    sums += weight * torch.stack([value.detach().float() for value in parts])
                grad_norm = accelerator.clip_grad_norm_(self.wrapped.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                sums = accelerator.reduce(sums, reduction="sum")
                for name, value in zip(names, sums.tolist()):
                    stats.setdefault(name, []).append(value)
                stats.setdefault("grad_norm", []).append(float(grad_norm))
        self.step += 1
        record = {name: sum(values) / len(values) for name, values in stats.items()}
        record.update(
            {
                "step": float(self.step),
                "score": float(scores.mean()),
                "reward_raw": float(sum(raw_scores) / len(raw_scores))
                if raw_scores is not None
                else float(scores.mean()),
                "kl": float((core.kl_penalty(old_logprobs, ref_logprobs, "k1") * mask).sum(dim=1).mean()),
                "non_score_reward": float((-args.kl_coef * kl).sum(dim=1).mean()),
                "value/mean": float(core.masked_mean(old_values, mask)),
                "response_length": float(mask.sum(dim=1).mean()),
                "eos_fraction": float(rollout.ended.float().mean()),
                "seconds": time.perf_counter() - started,
            }
        )
        return record

    # -- training loop, checkpoints, evaluation -----------------------------------------------

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> list[dict[str, float]]:
        """Run until ``num_iterations`` rollouts are done; returns the per-iteration log.

        ``resume_from_checkpoint``: a checkpoint folder, or ``True`` for the latest one in ``output_dir``;
        ``None`` falls back to ``args.resume_from_checkpoint``.
        """
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        if resume_from_checkpoint:
            path = self.latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                raise FileNotFoundError(f"no checkpoint-* folder in {self.args.output_dir} to resume from")
            self.load_checkpoint(path)
        self.state.max_steps = self.args.num_iterations
        self.state.global_step = self.step
        self.state.logging_steps = self.args.logging_steps
        self.state.save_steps = self.args.save_steps
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        while self.step < self.args.num_iterations:
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            record = self.rollout_step()
            self.history.append(record)
            self.state.global_step = self.step
            self.state.epoch = self.step * self.args.rollout_batch_size / len(self.rows)
            if self.accelerator.is_main_process:
                for callback in self.record_callbacks:
                    callback(record)
            if self.step % max(1, int(self.args.logging_steps)) == 0 or self.step == self.args.num_iterations:
                self.state.log_history.append(dict(record))
                self.control = self.callback_handler.on_log(self.args, self.state, self.control, dict(record))
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            if self.args.save_steps and self.step % self.args.save_steps == 0:
                self.save_checkpoint()
        # Decided from memory, not from the folder: another process may already have written checkpoint-STEP.
        if self._saved_step != self.step:
            self.save_checkpoint()
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return self.history

    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``checkpoint-N`` (a folder torn by a kill during its save is skipped)."""
        return last_complete_checkpoint(self.args.output_dir, set_aside=False)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write ``checkpoint-STEP`` (main process only; the others wait for it)."""
        path = Path(path or Path(self.args.output_dir) / f"checkpoint-{self.step}")
        if self.accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            torch.save(self._trainable_state(), path / "trainable.pt")
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            if self.is_peft:
                self.model.save_pretrained(str(path / "adapter"))
            config = _jsonable(without_secrets(asdict(self.args)))
            state = {"step": self.step, "history": self.history, "config": config}
            (path / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            self._rotate_checkpoints(keep=path)
        self.accelerator.wait_for_everyone()
        self._saved_step = self.step
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return path

    def _rotate_checkpoints(self, keep: Path) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        folders = checkpoints(self.args.output_dir)
        for folder in [f for f in folders if f != keep][: max(0, len(folders) - limit)]:
            shutil.rmtree(folder)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{path} is not a PPO checkpoint (no trainer_state.json)")
        state = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
        params = dict(("policy." + n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        params.update(("value_head." + n, p) for n, p in self.value_head.named_parameters())
        if set(state) != set(params):
            raise ValueError(f"checkpoint {path} does not match this model's trainable parameters")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        self.step, self.history = int(saved["step"]), list(saved["history"])
        self._saved_step = self.step

    @torch.no_grad()
    def evaluate(
        self,
        dataset: Sequence[Any],
        reward: RewardFunction | None = None,
        batch_size: int = 16,
        do_sample: bool = False,
    ) -> list[float]:
        """Rewards of the current policy's responses (greedy by default) on held-out prompts.

        The prompts are split over the processes; every process returns the scores of all of them, in order.
        """
        reward = reward or self.reward
        rows = _rows(dataset)
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        share = -(-len(rows) // processes)
        mine = rows[rank * share : (rank + 1) * share]
        scores: list[float] = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            prompts = [prompt_text(r["prompt"]) for r in chunk]
            rendered = render_prompts(self.tokenizer, prompts, self.args.use_chat_template)
            rollout = sample_responses(
                self.model,
                self.tokenizer,
                rendered,
                max_new_tokens=self.args.max_new_tokens,
                do_sample=do_sample,
                temperature=self.args.temperature,
                top_k=self.args.top_k,
                top_p=self.args.top_p,
            )
            columns = {key: [row[key] for row in chunk] for key in chunk[0] if key != "prompt"}
            scores += check_rewards(reward(prompts, rollout.texts, **columns), len(chunk), "reward")
        return scores if processes == 1 else list(gather_object(scores))


def _jsonable(value: Any) -> Any:
    """``asdict(TrainingArguments)`` holds enums and other objects; keep what JSON can write, name the rest."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "value", str(value))
