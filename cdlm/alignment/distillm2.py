"""``DistiLLM2Config`` + ``DistiLLM2Trainer``: contrastive distillation (Ko et al., ICML 2025).

The trainer follows TRL's conventions (a ``TrainingArguments`` dataclass config, the teacher passed
like DPO's ``ref_model``, ``processing_class``, ``peft_config``, TRL's preference collator) but
subclasses :class:`transformers.Trainer` directly: TRL 1.16's ``DPOTrainer`` patches the model with a
fused LM head that returns label log-probs only, while DistiLLM-2 needs the full next-token
distribution of both models. Neither model ever materialises (batch, seq, vocab) logits: the
decoders return hidden states, and the heads run over the completion positions in chunks of
``chunk_size`` positions (recomputed in the backward pass), see
:func:`cdlm.alignment.distillm2_losses.chunked_sequence_stats`.

Loss types (``loss_type``):

* ``distillm2``: (1 - beta) SKL_alpha(teacher responses) + beta SRKL_alpha(student responses),
  beta constant or increasing linearly (``beta_schedule="linear"``), alpha constant or per sample
  (``adaptive_alpha=True``, Algorithm 1).
* ``cald``: the same with beta fixed at 1/2.
* ``skl`` / ``srkl``: one side only. ``fkl``: plain forward-KL knowledge distillation on the teacher
  responses (the usual baseline; student responses are ignored and never computed).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl.trainer.dpo_trainer import DataCollatorForPreference

from cdlm.alignment.distill_data import (
    PAIR_FIELDS,
    SCORE_FIELDS,
    SamplingSettings,
    check_pair_rows,
    eos_token_ids,
    generate_from_ids,
    mean_logprobs,
    shared_vocab_size,
)
from cdlm.alignment.distillm2_losses import (
    adaptive_alpha,
    chunked_sequence_stats,
    distillm2_objective,
    likelihood_gap,
    linear_beta,
)

LOSS_TYPES = ("distillm2", "cald", "skl", "srkl", "fkl")


@dataclass
class DistiLLM2Config(TrainingArguments):
    """Training arguments for :class:`DistiLLM2Trainer` (all ``TrainingArguments`` fields apply).

    Defaults follow the paper/official release: alpha = 0.1 for both skews, beta = 1/2 (the
    official code's ``(2 - b) SKL + b SRKL`` with b = 1, halved), schedules off.
    """

    loss_type: str = field(default="distillm2", metadata={"help": f"one of {LOSS_TYPES}"})
    alpha: float = field(default=0.1, metadata={"help": "skew of SKL and SRKL, in (0, 1)"})
    beta: float = field(default=0.5, metadata={"help": "weight of SRKL on student responses (initial value), in [0, 1]"})
    beta_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (beta grows over training)"})
    beta_increase: float = field(default=0.5, metadata={"help": "linear schedule: beta gained over the whole run"})
    beta_max: float = field(default=1.0, metadata={"help": "linear schedule: beta is clipped to [beta, beta_max]"})
    adaptive_alpha: bool = field(default=False, metadata={"help": "per-sample alpha curriculum (Algorithm 1)"})
    alpha_min: float = field(default=0.01, metadata={"help": "lower clip of the adaptive alpha"})
    max_length: int | None = field(default=1024, metadata={"help": "truncate prompt+response to this many tokens"})
    chunk_size: int = field(default=256, metadata={"help": "completion positions per logits chunk"})
    reduction: str = field(default="sequence", metadata={"help": "'sequence': mean per response, then over the batch; 'token': over all tokens"})
    resample_student_every_epoch: bool = field(default=False, metadata={"help": "on-policy 'batch' mode: regenerate student responses each epoch"})
    resample_max_new_tokens: int = field(default=128)
    resample_temperature: float = field(default=1.0)
    resample_top_p: float = field(default=1.0)
    disable_dropout: bool = field(default=True)
    remove_unused_columns: bool = field(default=False)
    report_to: Any = field(default="none")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1) (0 would be plain KL, 1 a zero loss), got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.beta_schedule not in ("constant", "linear"):
            raise ValueError(f"beta_schedule must be 'constant' or 'linear', got {self.beta_schedule!r}")
        if self.beta_schedule == "linear" and not self.beta <= self.beta_max <= 1.0:
            raise ValueError(f"beta_max must lie in [beta={self.beta}, 1], got {self.beta_max}")
        if self.adaptive_alpha and not 0.0 < self.alpha_min <= self.alpha:
            raise ValueError(f"alpha_min must lie in (0, alpha={self.alpha}], got {self.alpha_min}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}")
        if self.reduction not in ("sequence", "token"):
            raise ValueError(f"reduction must be 'sequence' or 'token', got {self.reduction!r}")


class PairDataset(TorchDataset):
    """An in-memory list of token-id pairs; mutable so on-policy re-sampling can swap responses."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = [dict(row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def _completion_text(value: Any) -> str:
    if isinstance(value, list):  # conversational: the last assistant message
        return str(value[-1]["content"]) if value else ""
    return str(value)


def tokenize_pair_rows(rows: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Token ids for rows that carry only text (``prompt``/``chosen``/``rejected``, TRL's format).

    Rows that already hold ``prompt_ids``/``chosen_ids``/``rejected_ids`` (the output of
    :func:`cdlm.alignment.distill_data.generate_pairs`) are kept as they are. Text responses get the
    EOS token appended, as in TRL's ``DPOTrainer``.
    """
    out = []
    for number, row in enumerate(rows):
        if all(name in row for name in PAIR_FIELDS):
            out.append(row)
            continue
        missing = [name for name in ("prompt", "chosen", "rejected") if name not in row]
        if missing:
            raise ValueError(f"row {number} has neither token ids {PAIR_FIELDS} nor text fields (missing {missing})")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        else:
            prompt_ids = tokenizer(str(prompt))["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encode = lambda text: tokenizer(_completion_text(text), add_special_tokens=False)["input_ids"] + eos  # noqa: E731
        out.append({**row, "prompt_ids": list(prompt_ids), "chosen_ids": encode(row["chosen"]), "rejected_ids": encode(row["rejected"])})
    return out


@dataclass
class DistiLLM2Collator:
    """TRL's preference collator (chosen rows first, then rejected) plus the curriculum anchors."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        core = DataCollatorForPreference(pad_token_id=self.pad_token_id, max_length=self.max_length)
        batch = core([{name: example[name] for name in PAIR_FIELDS} for example in examples])
        if all(all(name in example for name in SCORE_FIELDS) for example in examples):
            for name in SCORE_FIELDS:
                batch[name] = torch.tensor([float(example[name]) for example in examples])
        return batch


def _logits_fn(model: PreTrainedModel, vocab_size: int):
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def fn(hidden: Tensor) -> Tensor:
        logits = head(hidden)[..., :vocab_size]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return fn


def _positions(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, rows: slice):
    """(row, position) of every position predicting a completion token in ``rows``, and its label."""
    predicts = (completion_mask[rows, 1:].bool() & attention_mask[rows, 1:].bool())
    row_index, col_index = predicts.nonzero(as_tuple=True)
    labels = input_ids[rows, 1:][row_index, col_index]
    return row_index, col_index, labels


class _ResampleCallback(TrainerCallback):
    def __init__(self, trainer: "DistiLLM2Trainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.epoch is not None and state.epoch >= 1:
            self.trainer.resample_student_responses()


class DistiLLM2Trainer(Trainer):
    """Trains ``model`` (the student) towards the frozen ``teacher_model`` with DistiLLM-2's loss.

    Args:
        model: the student, a ``PreTrainedModel`` or a path/hub id.
        teacher_model: the teacher (frozen; may be larger and of another architecture but must share
            the tokenizer), a model or a path/hub id.
        args: :class:`DistiLLM2Config`.
        train_dataset / eval_dataset: pair rows (list of dicts or ``datasets.Dataset``) with token ids
            ``prompt_ids``/``chosen_ids``/``rejected_ids`` (chosen = teacher response, rejected =
            student response), or text ``prompt``/``chosen``/``rejected``.
        processing_class: the (student's) tokenizer.
        teacher_processing_class: the teacher's tokenizer if it is a separate object; checked to
            be the same vocabulary.
        peft_config: a PEFT config (e.g. ``LoraConfig``) to train an adapter instead of all weights.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        teacher_model: PreTrainedModel | str,
        args: DistiLLM2Config | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any = None,
        data_collator: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        if args is None:
            args = DistiLLM2Config(output_dir="distillm2-output")
        if processing_class is None:
            raise ValueError("pass the student's tokenizer as processing_class")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model)
        if isinstance(teacher_model, str):
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model)
        if teacher_model is model:
            raise ValueError("teacher_model and model are the same object; the teacher must be a separate, frozen model")
        self.vocab_size = shared_vocab_size(model, teacher_model, processing_class, teacher_processing_class)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        if args.disable_dropout:
            for module in [*model.modules(), *teacher_model.modules()]:
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        train_dataset = self._prepare(train_dataset, processing_class, "train")
        if eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, processing_class, "eval")
        if data_collator is None:
            data_collator = DistiLLM2Collator(processing_class.pad_token_id, args.max_length)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # The loss is a mean over the micro-batch; let Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if args.adaptive_alpha:
            for dataset in (self.train_dataset, self.eval_dataset):
                if dataset is not None:
                    self._ensure_anchor_scores(dataset)
        if args.resample_student_every_epoch:
            self.add_callback(_ResampleCallback(self))

    # ------------------------------------------------------------------ data

    @staticmethod
    def _prepare(dataset: Any, tokenizer: PreTrainedTokenizerBase, name: str) -> PairDataset:
        if isinstance(dataset, PairDataset):
            return dataset
        rows = [dict(row) for row in dataset]
        if not rows:
            raise ValueError(f"the {name} pair dataset is empty")
        return PairDataset(check_pair_rows(tokenize_pair_rows(rows, tokenizer)))

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*PAIR_FIELDS, *SCORE_FIELDS]

    @torch.no_grad()
    def _ensure_anchor_scores(self, dataset: PairDataset, refresh: tuple[str, ...] = ()) -> None:
        """Fill the four mean log-probs (curriculum anchors) with the current models where missing."""
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        for side in ("chosen", "rejected"):
            rows = [r for r in dataset.rows if side in refresh or not all(f"{side}_{m}_logp" in r for m in ("teacher", "student"))]
            if not rows:
                continue
            prompts = [r["prompt_ids"] for r in rows]
            completions = [r[f"{side}_ids"] for r in rows]
            for who, net in (("teacher", teacher), ("student", student)):
                values = mean_logprobs(net, prompts, completions, vocab_size=self.vocab_size,
                                       batch_size=self.args.per_device_eval_batch_size)
                for row, value in zip(rows, values):
                    row[f"{side}_{who}_logp"] = value

    def resample_student_responses(self) -> None:
        """On-policy 'batch' mode: replace every rejected response by a fresh sample of the current student."""
        dataset: PairDataset = self.train_dataset
        student = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processing_class
        sampling = SamplingSettings(do_sample=True, temperature=self.args.resample_temperature, top_p=self.args.resample_top_p)
        fresh = generate_from_ids(
            student,
            [row["prompt_ids"] for row in dataset.rows],
            pad_token_id=tokenizer.pad_token_id,
            eos_ids=eos_token_ids(student, tokenizer),
            max_new_tokens=self.args.resample_max_new_tokens,
            sampling=sampling,
            batch_size=self.args.per_device_eval_batch_size,
            seed=self.args.seed + int(self.state.epoch or 0) * 7919,
        )
        for row, ids in zip(dataset.rows, fresh):
            row["rejected_ids"] = ids
            row["rejected"] = tokenizer.decode(ids, skip_special_tokens=True)
        if self.args.adaptive_alpha:
            # The anchors d_0 of the new responses are their gaps now (alpha restarts at alpha0 on them).
            self._ensure_anchor_scores(dataset, refresh=("rejected",))

    # ------------------------------------------------------------------ loss

    def current_beta(self) -> float:
        if self.args.loss_type == "cald":
            return 0.5
        if self.args.loss_type in ("skl", "fkl"):
            return 0.0
        if self.args.loss_type == "srkl":
            return 1.0
        if self.args.beta_schedule == "linear":
            return linear_beta(self.state.global_step, self.state.max_steps, self.args.beta,
                               self.args.beta_increase, self.args.beta_max)
        return self.args.beta

    def _hidden(self, model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        decoder = model.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        input_ids, attention_mask, completion_mask = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        pairs = input_ids.shape[0] // 2
        beta = self.current_beta()
        sides = [("chosen", slice(0, pairs), "fkl" if args.loss_type == "fkl" else "skl", 1.0 - beta)]
        if beta > 0:
            sides.append(("rejected", slice(pairs, 2 * pairs), "srkl", beta))
        if beta == 1.0:
            sides = sides[1:]
        rows = slice(sides[0][1].start, sides[-1][1].stop)
        # Drop the unused half before the forward passes (plain KD never sees student responses).
        ids, mask, comp = input_ids[rows], attention_mask[rows], completion_mask[rows]
        offset = rows.start
        unwrapped = self.accelerator.unwrap_model(model)
        student_fn = _logits_fn(unwrapped, self.vocab_size)
        teacher_fn = _logits_fn(self.accelerator.unwrap_model(self.teacher_model), self.vocab_size)
        student_hidden = self._hidden(unwrapped, ids, mask)
        with torch.no_grad():
            teacher_hidden = self._hidden(self.accelerator.unwrap_model(self.teacher_model), ids, mask)
        loss = student_hidden.new_zeros((), dtype=torch.float32)
        for side, side_rows, divergence, weight in sides:
            local = slice(side_rows.start - offset, side_rows.stop - offset)
            row_index, col_index, labels = _positions(ids, mask, comp, local)
            s_hidden = student_hidden[local][row_index, col_index]
            t_hidden = teacher_hidden[local][row_index, col_index]
            alpha: float | Tensor = args.alpha
            if args.adaptive_alpha and divergence in ("skl", "srkl") and f"{side}_teacher_logp" in inputs:
                with torch.no_grad():
                    now = chunked_sequence_stats(
                        student_hidden=s_hidden.detach(), teacher_hidden=t_hidden, labels=labels, seq_index=row_index,
                        num_sequences=pairs, student_logits_fn=student_fn, teacher_logits_fn=teacher_fn,
                        divergence=None, chunk_size=args.chunk_size,
                    )
                count = now["count"].clamp_min(1.0)
                t_mean, s_mean = now["teacher_logp"] / count, now["student_logp"] / count
                t0, s0 = inputs[f"{side}_teacher_logp"].float(), inputs[f"{side}_student_logp"].float()
                if side == "chosen":
                    gap, anchor = likelihood_gap(t_mean, s_mean), likelihood_gap(t0, s0)
                else:
                    gap, anchor = likelihood_gap(s_mean, t_mean), likelihood_gap(s0, t0)
                alpha = adaptive_alpha(gap, anchor, args.alpha, args.alpha_min)
                self._metrics[mode][f"alpha/{side}"].append(alpha.mean().item())
            stats = chunked_sequence_stats(
                student_hidden=s_hidden, teacher_hidden=t_hidden, labels=labels, seq_index=row_index,
                num_sequences=pairs, student_logits_fn=student_fn, teacher_logits_fn=teacher_fn,
                divergence=divergence, alpha=alpha, chunk_size=args.chunk_size,
            )
            count = stats["count"]
            valid = count > 0
            if args.reduction == "token":
                value = stats["divergence"].sum() / count.sum().clamp_min(1.0)
            else:
                value = (stats["divergence"][valid] / count[valid]).mean() if valid.any() else stats["divergence"].sum() * 0
            loss = loss + weight * value
            metrics = self._metrics[mode]
            metrics[f"{divergence}/{side}"].append(value.item())
            if valid.any():
                metrics[f"logps/{side}_student"].append((stats["student_logp"][valid] / count[valid]).mean().item())
                metrics[f"logps/{side}_teacher"].append((stats["teacher_logp"][valid] / count[valid]).mean().item())
        self._metrics[mode]["beta"].append(beta)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()


# ---------------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def distillation_metrics(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    rows: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    vocab_size: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Teacher-student agreement on held-out pairs, token-weighted over all completion tokens.

    ``kl_teacher_responses``: mean per-token KL(p || q) on teacher responses;
    ``student_logp_teacher_responses``: the student's mean log-likelihood per token of those
    responses (and the teacher's own, for reference); ``rkl_student_responses``: mean KL(q || p) on
    the student-response field of the rows (as stored; not regenerated).
    """
    vocab = vocab_size or min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    collator = DistiLLM2Collator(pad_token_id)
    student_fn, teacher_fn = _logits_fn(student, vocab), _logits_fn(teacher, vocab)
    totals: dict[str, float] = defaultdict(float)
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator(list(rows[start : start + batch_size]))
            pairs = batch["input_ids"].shape[0] // 2
            ids = batch["input_ids"].to(student.device)
            mask = batch["attention_mask"].to(student.device)
            comp = batch["completion_mask"].to(student.device)
            s_hidden = student.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            t_hidden = teacher.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            for side, rows_slice, divergence in (("teacher_responses", slice(0, pairs), "fkl"), ("student_responses", slice(pairs, 2 * pairs), "rkl")):
                r, c, labels = _positions(ids, mask, comp, rows_slice)
                stats = chunked_sequence_stats(
                    student_hidden=s_hidden[rows_slice][r, c], teacher_hidden=t_hidden[rows_slice][r, c],
                    labels=labels, seq_index=r, num_sequences=pairs, student_logits_fn=student_fn,
                    teacher_logits_fn=teacher_fn, divergence=divergence, chunk_size=chunk_size,
                )
                totals[f"{divergence}_{side}"] += stats["divergence"].sum().item()
                totals[f"student_logp_{side}"] += stats["student_logp"].sum().item()
                totals[f"teacher_logp_{side}"] += stats["teacher_logp"].sum().item()
                totals[f"tokens_{side}"] += stats["count"].sum().item()
    finally:
        student.train(was_training)
    result = {}
    for key, value in totals.items():
        if key.startswith("tokens_"):
            result[key] = int(value)
        else:
            side = "teacher_responses" if key.endswith("teacher_responses") else "student_responses"
            result[key.replace("fkl_", "kl_")] = value / max(totals[f"tokens_{side}"], 1.0)
    return result


def clone_model(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy (students are trained in place; keep the original for comparisons)."""
    return copy.deepcopy(model)
