"""``DistiLLM2Config`` + ``DistiLLM2Trainer``: contrastive distillation (Ko et al., ICML 2025).

The trainer follows TRL's conventions (a ``TrainingArguments`` dataclass config, the teacher passed
like DPO's ``ref_model``, ``processing_class``, ``peft_config``, TRL's preference collator) but
subclasses :class:`transformers.Trainer` directly: TRL 1.16's ``DPOTrainer`` patches the model with a
fused LM head that returns label log-probs only, while DistiLLM-2 needs the full next-token
distribution of both models. Neither model ever materialises (batch, seq, vocab) logits: the
decoders return hidden states, and the heads run over the completion positions in chunks of
``chunk_size`` positions (recomputed in the backward pass), see
:func:`cdlm.alignment.distill.losses.chunked_sequence_stats`.

Loss types (``loss_type``):

* ``distillm2``: (1 - beta) SKL_alpha(teacher responses) + beta SRKL_alpha(student responses),
  beta constant or increasing linearly (``beta_schedule="linear"``), alpha constant or per sample
  (``adaptive_alpha=True``, Algorithm 1).
* ``cald``: the same with beta fixed at 1/2.
* ``skl`` / ``srkl``: one side only. ``fkl``: plain forward-KL knowledge distillation on the teacher
  responses (the usual baseline; student responses are ignored and never computed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)

from cdlm.alignment.callbacks import StopOnNonFinite
from cdlm.alignment.distill.config import DistiLLM2Config
from cdlm.alignment.distill.dataset import DistiLLM2Collator, PairDataset, tokenize_pair_rows
from cdlm.alignment.distill.losses import (
    adaptive_alpha,
    chunked_sequence_stats,
    likelihood_gap,
    linear_beta,
)
from cdlm.alignment.distill.pairs import (
    PAIR_FIELDS,
    SCORE_FIELDS,
    SamplingSettings,
    check_pair_rows,
    generate_from_ids,
    mean_logprobs,
    shared_vocab_size,
)
from cdlm.alignment.parallel import check_launch, refuse_sharded_weights
from cdlm.models.lm_head import LogitTransform, apply_head
from cdlm.models.prompts import eos_token_ids


def _logits_fn(model: PreTrainedModel, vocab_size: int):
    """The model's own head (lm_head, logit scaling, soft-capping) restricted to the shared vocabulary."""
    head = model.get_output_embeddings()
    transform = LogitTransform.from_model(model)
    bias = None if head.bias is None else head.bias[:vocab_size]

    def fn(hidden: Tensor) -> Tensor:
        # The Trainer may hand back float32 hidden states of a bf16 model (mixed precision): match the head.
        return apply_head(hidden.to(head.weight.dtype), head.weight[:vocab_size], bias, transform)

    return fn


def _positions(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, rows: slice):
    """(row, position) of every position predicting a completion token in ``rows``, and its label."""
    predicts = completion_mask[rows, 1:].bool() & attention_mask[rows, 1:].bool()
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
            raise ValueError(
                "teacher_model and model are the same object; the teacher must be a separate, frozen model"
            )
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
        check_launch(self.accelerator)
        self.add_callback(StopOnNonFinite())
        refuse_sharded_weights(self.accelerator, "DistiLLM2Trainer")
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
            rows = [
                r
                for r in dataset.rows
                if side in refresh or not all(f"{side}_{m}_logp" in r for m in ("teacher", "student"))
            ]
            if not rows:
                continue
            prompts = [r["prompt_ids"] for r in rows]
            completions = [r[f"{side}_ids"] for r in rows]
            for who, net in (("teacher", teacher), ("student", student)):
                values = mean_logprobs(
                    net,
                    prompts,
                    completions,
                    vocab_size=self.vocab_size,
                    batch_size=self.args.per_device_eval_batch_size,
                )
                for row, value in zip(rows, values):
                    row[f"{side}_{who}_logp"] = value

    def resample_student_responses(self) -> None:
        """On-policy 'batch' mode: replace every rejected response by a fresh sample of the current student."""
        dataset: PairDataset = self.train_dataset
        student = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processing_class
        sampling = SamplingSettings(
            do_sample=True, temperature=self.args.resample_temperature, top_p=self.args.resample_top_p
        )
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
            return linear_beta(
                self.state.global_step,
                self.state.max_steps,
                self.args.beta,
                self.args.beta_increase,
                self.args.beta_max,
            )
        return self.args.beta

    def _hidden(self, model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final-norm hidden states from ``model``'s own forward.

        The student must be called through the model ``Trainer`` hands to ``compute_loss`` (the DDP /
        FSDP / DeepSpeed wrapper): running its unwrapped decoder instead skips the wrapper's forward,
        and DDP then never all-reduces the gradients. ``logits_to_keep=1`` keeps the forward from
        projecting every position through the LM head; the losses apply the head to completion
        positions only, in chunks.
        """
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return output.hidden_states[-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        input_ids, attention_mask, completion_mask = (
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
        )
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
        student_hidden = self._hidden(model, ids, mask)
        with torch.no_grad():
            teacher_hidden = self._hidden(self.teacher_model, ids, mask)
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
                        student_hidden=s_hidden.detach(),
                        teacher_hidden=t_hidden,
                        labels=labels,
                        seq_index=row_index,
                        num_sequences=pairs,
                        student_logits_fn=student_fn,
                        teacher_logits_fn=teacher_fn,
                        divergence=None,
                        chunk_size=args.chunk_size,
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
                student_hidden=s_hidden,
                teacher_hidden=t_hidden,
                labels=labels,
                seq_index=row_index,
                num_sequences=pairs,
                student_logits_fn=student_fn,
                teacher_logits_fn=teacher_fn,
                divergence=divergence,
                alpha=alpha,
                chunk_size=args.chunk_size,
            )
            count = stats["count"]
            valid = count > 0
            if args.reduction == "token":
                tokens, processes = count.sum(), self.accelerator.num_processes
                if model.training and processes > 1:
                    # A mean over the tokens of the whole global batch: DDP averages the processes' gradients,
                    # so each process divides its sum by the global count and multiplies by the process count.
                    tokens = self.accelerator.reduce(tokens.detach().clone(), reduction="sum") / processes
                value = stats["divergence"].sum() / tokens.clamp_min(1.0)
            else:
                value = (
                    (stats["divergence"][valid] / count[valid]).mean()
                    if valid.any()
                    else stats["divergence"].sum() * 0
                )
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
        if self.accelerator.num_processes > 1:
            # Each process saw its own share of the batch; log the mean over processes (Trainer logs the loss so).
            per_process = gather_object([metrics])
            names = sorted({name for part in per_process for name in part})
            metrics = {
                name: sum(values) / len(values)
                for name in names
                for values in [[part[name] for part in per_process if name in part]]
            }
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()
