"""``PreferenceTrainer``: one TRL ``DPOTrainer`` subclass for DPO, APO-zero, APO-down, CPO and SparsePO.

What is reused and what is overridden, and why:

* **DPO / APO-zero / APO-down** are TRL loss types: :class:`~cdlm.alignment.PreferenceConfig` sets ``loss_type``
  and the trainer calls ``DPOTrainer._compute_loss`` unchanged (TRL's fused, chunked LM head; metrics; PEFT
  reference by disabling the adapter).
* **CPO** is reference-free: one policy forward through TRL's fused LM head gives per-token log-probabilities for
  the preference term and the chosen-reply NLL; no reference forward, and no reference copy is built.
* **SparsePO** needs full-vocabulary distributions of policy and reference at each completion token (for the token
  KL), plus reference activations or hidden states for the masks. It runs the backbones directly and projects only
  completion positions through the LM head, a chunk at a time
  (:func:`~cdlm.alignment.preference.losses.chunked_token_logps_and_kl`).
  Learned masks (:class:`~cdlm.alignment.preference.sparsepo.SparseTokenMasks`) get their own optimizer parameter group
  (weight decay, learning rate) and are saved next to the adapter as ``sparsepo_masks.safetensors``.

Everything else (data preprocessing, collation, PEFT wrapping, checkpointing, logging) is TRL's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import torch
from accelerate.utils import DistributedType, is_peft_model
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from cdlm import progress
from cdlm.alignment.callbacks import StopOnNonFinite
from cdlm.alignment.parallel import check_launch, refuse_sharded_weights
from cdlm.alignment.preference.config import TRL_LOSS_TYPES, PreferenceConfig
from cdlm.alignment.preference.data import PreferenceDataReport, validate_preference_dataset
from cdlm.alignment.preference.displacement import attach_displacement_monitor
from cdlm.alignment.preference.losses import chosen_nll, chunked_token_logps_and_kl, cpo_loss, sparsepo_loss
from cdlm.alignment.preference.sparsepo import (
    SparseTokenMasks,
    activation_token_mask,
    capture_activations,
    decoder_layers,
    mask_sparsity,
    resolve_layers,
)
from cdlm.models.lm_head import LogitTransform

logger = logging.getLogger(__name__)

MASKS_WEIGHTS_NAME = "sparsepo_masks.safetensors"
MASKS_CONFIG_NAME = "sparsepo_masks.json"
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class _ZeroMaskGradients(TrainerCallback):
    """Trainer zeroes the model's gradients after each optimizer step; the SparsePO mask heads live outside it."""

    def __init__(self, masks: SparseTokenMasks):
        self.masks = masks

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masks.zero_grad(set_to_none=True)


class PreferenceTrainer(DPOTrainer):
    """Train a causal LM (usually a LoRA adapter) on preference pairs with the objective in ``args.method``.

    Takes the same arguments as :class:`trl.DPOTrainer`; ``args`` must be a :class:`PreferenceConfig`. Datasets are
    checked first with :func:`~cdlm.alignment.preference.data.validate_preference_dataset`
    (``args.on_invalid_pairs``); the reports are kept in ``train_data_report`` / ``eval_data_report``.

    Example::

        from peft import LoraConfig
        from cdlm.alignment import PreferenceConfig, PreferenceTrainer, load_default_splits

        train, test = load_default_splits()
        args = PreferenceConfig(output_dir="out", method="sparsepo", max_steps=20, bf16=False,
                                gradient_checkpointing=False, report_to=[])
        trainer = PreferenceTrainer(model, args=args, train_dataset=train, processing_class=tokenizer,
                                    peft_config=LoraConfig(r=8, target_modules="all-linear"))
        trainer.train()
    """

    _tag_names = ["trl", "dpo", "cdlm"]
    _name = "cdlm Preference"

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: PreferenceConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = PreferenceConfig(output_dir="cdlm-preference")
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args must be a PreferenceConfig, got {type(args).__name__}")
        self.method = args.method
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        self.train_data_report: PreferenceDataReport | None = None
        self.eval_data_report: PreferenceDataReport | dict[str, PreferenceDataReport] | None = None
        if isinstance(train_dataset, Dataset):
            train_dataset, self.train_data_report = self._validate(train_dataset, tokenizer, args)
        if isinstance(eval_dataset, Dataset):
            eval_dataset, self.eval_data_report = self._validate(eval_dataset, tokenizer, args)
        elif isinstance(eval_dataset, dict):
            reports = {}
            for name, split in list(eval_dataset.items()):
                if isinstance(split, Dataset):
                    eval_dataset[name], reports[name] = self._validate(split, tokenizer, args)
            self.eval_data_report = reports

        # CPO needs no reference. Without PEFT, DPOTrainer would build a reference copy of the model (from the hub
        # id in its config); claiming precomputed reference log-probs skips that, and `_precompute_ref_logps` below
        # turns the precompute pass itself into a no-op.
        if self.method == "cpo" and ref_model is not None:
            raise ValueError("method='cpo' is reference-free and would ignore the given ref_model: drop it")
        skip_reference = self.method == "cpo" and kwargs.get("peft_config") is None and not is_peft_model(model)
        if skip_reference:
            args.precompute_ref_log_probs = True
        try:
            super().__init__(
                model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        finally:
            if skip_reference:
                args.precompute_ref_log_probs = False
        if skip_reference:
            self.precompute_ref_logps = False
        check_launch(self.accelerator)

        self.mask_module: SparseTokenMasks | None = None
        self._mask_layers: list[int] = []
        if self.method == "sparsepo":
            refuse_sharded_weights(self.accelerator, "SparsePO")
            base = self._base_model(self.model)
            num_layers = len(decoder_layers(base.base_model))
            self._mask_layers = resolve_layers(args.sparsepo_layers, num_layers)
            if args.sparsepo_mask_type == "learned":
                if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
                    raise ValueError(
                        "SparsePO learned masks are trained outside the sharded model, which "
                        f"{self.accelerator.distributed_type.value} does not support; use DDP (torchrun) or "
                        "sparsepo_mask_type='activation'"
                    )
                hidden_size = base.config.get_text_config().hidden_size
                # hidden_states[i + 1] is the output of decoder layer i
                self.mask_module = SparseTokenMasks(
                    hidden_size, [i + 1 for i in self._mask_layers], shared=args.sparsepo_shared_mask
                ).to(self.args.device)
                self.add_callback(_ZeroMaskGradients(self.mask_module))
                if self.accelerator.num_processes > 1:
                    # The masks live outside the wrapped model: start every process from rank 0's heads.
                    for tensor in self.mask_module.state_dict().values():
                        torch.distributed.broadcast(tensor, src=0)
        self.add_callback(StopOnNonFinite((self.mask_module,) if self.mask_module is not None else ()))
        # Likelihood-displacement monitoring (args.displacement_pairs > 0); None when off.
        self.displacement = attach_displacement_monitor(self)

    # ------------------------------------------------------------------ setup helpers

    @staticmethod
    def _validate(dataset: Dataset, tokenizer: Any, args: PreferenceConfig) -> tuple[Dataset, PreferenceDataReport]:
        already_tokenized = "prompt_ids" in dataset.column_names and "prompt" not in dataset.column_names
        if already_tokenized:
            return dataset, PreferenceDataReport(total=len(dataset))
        return validate_preference_dataset(
            dataset, tokenizer=tokenizer, max_length=args.max_length, on_invalid=args.on_invalid_pairs
        )

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if self.method == "cpo":
            return dataset  # reference-free: nothing to precompute
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """Adapter-disabled policy as the reference (PEFT without a separate ``ref_model``)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.mask_module is not None and not getattr(self, "_mask_group_added", False):
            optimizer.add_param_group(
                {
                    "params": [p for p in self.mask_module.parameters() if p.requires_grad],
                    "weight_decay": self.args.sparsepo_mask_weight_decay,
                    "lr": self.args.sparsepo_mask_learning_rate or self.args.learning_rate,
                }
            )
            self._mask_group_added = True
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.mask_module is not None and self.accelerator.num_processes > 1:
            # DDP averages the gradients of the wrapped model only; average the mask heads' the same way.
            for parameter in self.mask_module.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.SUM)
                    parameter.grad /= self.accelerator.num_processes
        return loss

    # ------------------------------------------------------------------ saving / resuming the learned masks

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.mask_module is not None and self.args.should_save:
            save_sparse_masks(self.mask_module, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.displacement is not None:
            self.displacement.restore(resume_from_checkpoint)
        if self.mask_module is not None and os.path.exists(os.path.join(resume_from_checkpoint, MASKS_WEIGHTS_NAME)):
            load_sparse_masks(resume_from_checkpoint, into=self.mask_module)

    # ------------------------------------------------------------------ losses

    def _compute_loss(self, model, inputs, return_outputs):
        if self.method in TRL_LOSS_TYPES:
            return super()._compute_loss(model, inputs, return_outputs)
        if self.method == "cpo":
            loss = self._cpo_loss(model, inputs)
        else:
            loss = self._sparsepo_loss(model, inputs)
        if return_outputs:
            # Same contract as DPOTrainer: logits for compute_metrics come from an extra forward.
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            with torch.no_grad():
                return loss, model(**model_kwargs, use_cache=False)
        return loss

    def _log_pair_metrics(self, mode: str, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())

    def _global_token_mean_count(self, model, mask: torch.Tensor) -> torch.Tensor:
        """The denominator that makes a token mean under DDP equal the token mean of the whole global batch.

        DDP averages the processes' gradients, so each process divides its token sum by (global token count /
        number of processes). One process (and evaluation, whose losses are gathered per process) keeps its count.
        """
        tokens, processes = mask.sum().detach().float(), self.accelerator.num_processes
        if model.training and processes > 1:
            tokens = self.accelerator.reduce(tokens, reduction="sum") / processes
        return tokens

    def _cpo_loss(self, model, inputs) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1) :]  # zero outside the completion
        chosen_logps, rejected_logps = per_token_logps.sum(-1).chunk(2)
        chosen_token_logps, _ = per_token_logps.chunk(2)
        chosen_mask, _ = shift_mask.chunk(2)
        nll = chosen_nll(chosen_token_logps, chosen_mask, num_tokens=self._global_token_mean_count(model, chosen_mask))
        loss, _ = cpo_loss(
            chosen_logps, rejected_logps, nll, self.beta, self.args.cpo_alpha, self.args.label_smoothing
        )
        beta = self.beta
        self._log_pair_metrics(mode, beta * chosen_logps.detach(), beta * rejected_logps.detach())
        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["nll_loss"].append(gather(nll.detach()).mean().item())
        self._metrics[mode]["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        return loss

    def _sparsepo_loss(self, model, inputs) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        args: PreferenceConfig = self.args
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        shift_mask = inputs["completion_mask"][:, 1:].bool()
        labels = input_ids[:, 1:][shift_mask]

        policy_base = self._base_model(model)
        # Through `model` (the DDP/FSDP/DeepSpeed wrapper Trainer passes in), not the unwrapped backbone: a
        # forward that skips the wrapper is never all-reduced. logits_to_keep=1: the head runs in chunks below.
        policy_hidden = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        ).hidden_states[-1]
        head = policy_base.get_output_embeddings()

        ref_base = policy_base if self.ref_model is None else self._base_model(self.ref_model)
        ref_head = ref_base.get_output_embeddings()
        source = args.sparsepo_activation
        want_hidden = args.sparsepo_mask_type == "learned" or source == "residual"
        hook_source = source if args.sparsepo_mask_type == "activation" else "none"
        with (
            torch.no_grad(),
            self._reference_context(),
            capture_activations(ref_base.base_model, hook_source, self._mask_layers) as captured,
        ):
            ref_out = ref_base.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=want_hidden
            )
        ref_hidden = ref_out.last_hidden_state

        policy_logps, ref_logps, token_kl = chunked_token_logps_and_kl(
            policy_hidden[:, :-1][shift_mask],
            ref_hidden[:, :-1][shift_mask],
            head.weight,
            head.bias,
            labels,
            ref_weight=ref_head.weight,
            ref_bias=ref_head.bias,
            transform=LogitTransform.from_model(policy_base),
            chunk_size=args.sparsepo_chunk_size,
        )

        def scatter(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(shift_mask.shape).masked_scatter(shift_mask, values)

        if self.mask_module is not None:
            reward_mask, kl_mask = self.mask_module([h[:, :-1] for h in ref_out.hidden_states])
        else:
            if source == "residual":
                activations = [ref_out.hidden_states[i + 1] for i in self._mask_layers]
            elif source == "logits":
                # mean over the vocabulary of the (pre-softcap) logits is linear in the hidden state
                mean_row = ref_head.weight.float().mean(0)
                bias = ref_head.bias.float().mean() if ref_head.bias is not None else 0.0
                activations = [(ref_hidden.float() @ mean_row + bias)]
            else:
                activations = list(captured)
            reward_mask = activation_token_mask([a[:, :-1] for a in activations], shift_mask)
            kl_mask = reward_mask

        out = sparsepo_loss(
            scatter(policy_logps),
            scatter(ref_logps),
            scatter(token_kl),
            shift_mask,
            reward_mask,
            kl_mask,
            self.beta,
            mask_l1=args.sparsepo_mask_l1 if self.mask_module is not None else 0.0,
            num_tokens=self._global_token_mean_count(model, shift_mask),
        )
        self._log_pair_metrics(mode, out.chosen_rewards, out.rejected_rewards)
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["kl/chosen"].append(gather(out.chosen_kl).mean().item())
        metrics["kl/rejected"].append(gather(out.rejected_kl).mean().item())
        completion = shift_mask.float()
        metrics["mask/mean"].append(float((reward_mask.detach() * completion).sum() / completion.sum().clamp(min=1)))
        metrics["mask/sparsity"].append(mask_sparsity(reward_mask.detach(), shift_mask))
        if kl_mask is not reward_mask:
            metrics["mask/kl_sparsity"].append(mask_sparsity(kl_mask.detach(), shift_mask))
        metrics["mask/l1"].append(out.l1.item())
        return out.loss

    # ------------------------------------------------------------------ evaluation of preferences

    @torch.no_grad()
    def preference_metrics(
        self, dataset: Dataset, batch_size: int | None = None, reference_logps: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Held-out preference metrics of the current policy against the reference, per pair then averaged.

        * ``reward_accuracy``: fraction of pairs whose sequence-level implicit reward
          :math:`\\beta(\\log\\pi-\\log\\pi_{ref})` is higher for the chosen reply, ties (e.g. before training,
          when policy == reference) counted as 1/2.
        * ``reward_margin``: mean of :math:`r_w - r_l`.
        * ``logratio_accuracy`` / ``logratio_margin``: the same with the reference-free policy log-ratio
          :math:`\\log\\pi(y_w)-\\log\\pi(y_l)` (CPO's implicit reward; meaningful before training too).

        ``reference_logps`` (``(N, 2)`` chosen/rejected, from ``self.last_preference_logps[1]`` of an earlier call on
        the same dataset) skips the reference forward passes. ``self.last_preference_logps`` holds
        ``(policy_logps, reference_logps)`` after each call.
        """
        if "prompt_ids" not in dataset.column_names:
            dataset, _ = self._validate(dataset, self._tokenizer, self.args)
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "preference_metrics")
        columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in dataset.column_names]
        loader = DataLoader(
            dataset.select_columns(columns),
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        was_training = self.model.training
        self.model.eval()
        # A fresh LoRA adapter (every B matrix zero) is the identity: policy == reference, one pass suffices.
        identity = reference_logps is None and self._adapter_is_identity()
        policy, reference = [], []
        try:
            with progress.track(len(dataset), "held-out preference metrics", unit="pair") as tracker:
                for batch in loader:
                    batch = self._prepare_inputs(batch)
                    policy.append(torch.stack(self._sequence_logps(self.model, batch), -1).cpu())
                    if reference_logps is None and not identity:
                        ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, batch)
                        reference.append(torch.stack([ref_chosen, ref_rejected], -1).cpu())
                    tracker.update(policy[-1].shape[0])
        finally:
            self.model.train(was_training)
        policy_logps = torch.cat(policy).double()
        if identity:
            ref_logps = policy_logps.clone()
        else:
            ref_logps = torch.cat(reference).double() if reference_logps is None else reference_logps.double().cpu()
        if ref_logps.shape != policy_logps.shape:
            raise ValueError(
                f"reference_logps has shape {tuple(ref_logps.shape)}, expected {tuple(policy_logps.shape)}"
            )
        self.last_preference_logps = (policy_logps, ref_logps)
        rewards = self.beta * (policy_logps - ref_logps)
        margins = rewards[:, 0] - rewards[:, 1]
        logratio = policy_logps[:, 0] - policy_logps[:, 1]

        def accuracy(diff: torch.Tensor) -> float:
            return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())

        return {
            "pairs": int(len(margins)),
            "reward_accuracy": accuracy(margins),
            "reward_margin": float(margins.mean()),
            "logratio_accuracy": accuracy(logratio),
            "logratio_margin": float(logratio.mean()),
        }

    def _adapter_is_identity(self) -> bool:
        """True when the reference is the adapter-disabled policy and every LoRA B matrix is zero."""
        if self.ref_model is not None or not is_peft_model(self.model):
            return False
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in unwrapped.peft_config:
            return False
        lora_b = [p for n, p in unwrapped.named_parameters() if "lora_B" in n]
        if not lora_b or any(
            ("lora_" in n and "lora_A" not in n and "lora_B" not in n) for n, _ in unwrapped.named_parameters()
        ):
            return False
        return all(not bool(p.detach().any()) for p in lora_b)

    def _sequence_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        completion_mask = batch["completion_mask"]
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
        log_probs = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
        return log_probs[:, -(completion_mask.size(1) - 1) :].sum(-1).chunk(2)


def save_sparse_masks(masks: SparseTokenMasks, output_dir: str) -> None:
    """Write learned SparsePO masks next to an adapter: ``sparsepo_masks.safetensors`` + ``sparsepo_masks.json``."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in masks.state_dict().items()}
    save_file(state, os.path.join(output_dir, MASKS_WEIGHTS_NAME))
    hidden_size = masks.reward.heads[0][0].normalized_shape[0]
    with open(os.path.join(output_dir, MASKS_CONFIG_NAME), "w") as handle:
        json.dump({"hidden_size": hidden_size, "layers": masks.layers, "shared": masks.shared}, handle)


def load_sparse_masks(directory: str, into: SparseTokenMasks | None = None) -> SparseTokenMasks:
    """Load masks saved by :func:`save_sparse_masks` (into an existing module, or a new one)."""
    from safetensors.torch import load_file

    if into is None:
        with open(os.path.join(directory, MASKS_CONFIG_NAME)) as handle:
            spec = json.load(handle)
        into = SparseTokenMasks(spec["hidden_size"], spec["layers"], shared=spec["shared"])
    state = load_file(os.path.join(directory, MASKS_WEIGHTS_NAME))
    device = next(into.parameters()).device
    into.load_state_dict({k: v.to(device) for k, v in state.items()})
    return into


__all__ = ["PreferenceTrainer", "save_sparse_masks", "load_sparse_masks"]
