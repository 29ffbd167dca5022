"""``PreferenceConfig``: TRL's ``DPOConfig`` plus the choice of objective and its extra hyperparameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from cdlm.alignment.parallel import use_cpu_for_cpu_launch
from cdlm.alignment.settings import check_values

METHODS: tuple[str, ...] = ("dpo", "apo_zero", "apo_down", "cpo", "sparsepo")
"""Objectives :class:`~cdlm.alignment.PreferenceTrainer` can train with."""

# DPO and APO are TRL loss types already; the trainer delegates them to DPOTrainer unchanged.
TRL_LOSS_TYPES: dict[str, str] = {"dpo": "sigmoid", "apo_zero": "apo_zero", "apo_down": "apo_down"}


CHANGED_TRL_DEFAULTS: dict[str, tuple[Any, Any]] = {}
"""Fields whose default differs from TRL's ``DPOConfig``: name -> (cdlm default, TRL default)."""


def _changed_default(name: str, default: Any, help_text: str) -> Any:
    """A field whose default differs from ``DPOConfig``'s; its help (and so ``--help``) names TRL's default."""
    trl_field = DPOConfig.__dataclass_fields__[name]
    trl_default = trl_field.default
    if trl_default is dataclasses.MISSING and trl_field.default_factory is not dataclasses.MISSING:
        trl_default = trl_field.default_factory()
    CHANGED_TRL_DEFAULTS[name] = (default, trl_default)
    return field(default=default, metadata={"help": f"{help_text} TRL default: {trl_default}."})


# Settings only some methods read: a non-default value with another method would be silently ignored.
_METHOD_ONLY = {"cpo_alpha": ("cpo",)}
_LEARNED_MASK_ONLY = ("sparsepo_shared_mask", "sparsepo_mask_l1", "sparsepo_mask_weight_decay")


@dataclass
class PreferenceConfig(DPOConfig):
    r"""Configuration for :class:`~cdlm.alignment.PreferenceTrainer`.

    Everything in :class:`trl.DPOConfig` applies (``beta``, ``max_length``, ``learning_rate``...). ``method`` picks the
    objective; for ``dpo``/``apo_zero``/``apo_down`` it sets TRL's ``loss_type`` so TRL computes the loss itself.

    Parameters:
        method: one of ``dpo``, ``apo_zero``, ``apo_down``, ``cpo``, ``sparsepo``.
        cpo_alpha: weight :math:`\alpha` of CPO's NLL term on the chosen replies.
        sparsepo_mask_type: ``"learned"`` (trained heads on reference hidden states) or ``"activation"`` (derived
            from reference activations, no parameters).
        sparsepo_activation: for activation masks, which activations: ``mlp``, ``attn``, ``residual`` or ``logits``.
        sparsepo_layers: decoder-layer indices (negative from the end) feeding the masks; empty = all layers.
        sparsepo_shared_mask: learned masks only: one mask for reward and KL (``True``) or two independent masks.
        sparsepo_mask_l1: weight of the L1 penalty on the learned masks (drives exact zeros).
        sparsepo_mask_weight_decay: weight decay of the mask heads' own optimizer parameter group.
        sparsepo_mask_learning_rate: learning rate of the mask heads (defaults to ``learning_rate``).
        sparsepo_chunk_size: completion tokens per full-vocabulary logits chunk (bounds peak memory).
        bf16: as in TRL, but when left unset it is only turned on where CUDA supports bf16 (TRL's default of
            ``True`` fails on CPU-only machines).
        on_invalid_pairs: what to do with empty/identical pairs and prompts that fill ``max_length``: ``"drop"``
            (with a counted warning), ``"error"`` or ``"keep"``.
        displacement_pairs: number of pairs (the first of the eval set, else of the training set) on which the
            drift of chosen/rejected log-probabilities since step 0 is logged (likelihood displacement, see
            :mod:`cdlm.alignment.preference.displacement`); ``0`` turns the monitoring off.
        displacement_steps: measure every N optimizer steps; ``0`` = at every logging step.
    """

    # cdlm trains LoRA adapters by default: TRL's full-fine-tuning defaults (learning rate 1e-6, 3 epochs)
    # barely move an adapter, so these few defaults differ from DPOConfig's; each field's help says so.
    learning_rate: float = _changed_default(
        "learning_rate", 5e-5, "Initial AdamW learning rate (suits LoRA adapters)."
    )
    num_train_epochs: float = _changed_default("num_train_epochs", 1.0, "Passes over the training pairs.")
    per_device_train_batch_size: int = _changed_default("per_device_train_batch_size", 4, "Pairs per device per step.")
    max_length: int | None = _changed_default("max_length", 512, "Max tokens of prompt + reply (longer: truncated).")
    logging_steps: float = _changed_default("logging_steps", 5, "Log every N optimizer steps.")
    save_steps: float = _changed_default("save_steps", 50, "Save a checkpoint every N optimizer steps.")
    method: str = field(default="dpo", metadata={"help": "Objective.", "choices": METHODS})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL term on chosen replies (CPO)."})
    sparsepo_mask_type: str = field(
        default="learned",
        metadata={
            "help": "SparsePO masks: trained heads or reference activations.",
            "choices": ("learned", "activation"),
        },
    )
    sparsepo_activation: str = field(
        default="mlp",
        metadata={"help": "Activation masks: which activations.", "choices": ("mlp", "attn", "residual", "logits")},
    )
    sparsepo_layers: list[int] = field(
        default_factory=list, metadata={"help": "Layers feeding the masks (negative from the end); empty = all."}
    )
    sparsepo_shared_mask: bool = field(default=True, metadata={"help": "One learned mask for both terms."})
    sparsepo_mask_l1: float = field(default=0.0, metadata={"help": "L1 penalty weight on learned masks."})
    sparsepo_mask_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the mask heads."})
    sparsepo_mask_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the mask heads (default: learning_rate)."}
    )
    sparsepo_chunk_size: int = field(default=256, metadata={"help": "Tokens per full-vocabulary logits chunk."})
    on_invalid_pairs: str = field(
        default="drop",
        metadata={
            "help": "Empty/identical pairs and prompts filling max_length: drop (counted warning), error or keep.",
            "choices": ("drop", "error", "keep"),
        },
    )
    displacement_pairs: int = field(
        default=32,
        metadata={
            "help": "Pairs (eval set first, else training set) on which chosen/rejected log-prob drift since "
            "step 0 is logged (likelihood displacement); 0 = off."
        },
    )
    displacement_steps: int = field(
        default=0, metadata={"help": "Measure displacement every N optimizer steps; 0 = at every logging step."}
    )

    def __post_init__(self) -> None:
        check_values(self)
        self.method = str(self.method).lower().replace("-", "_")
        if self.method not in METHODS:
            raise ValueError(f"unknown preference method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.method in TRL_LOSS_TYPES:
            # `loss_type` is TRL's switch; a user-given non-default value would silently change the objective.
            requested = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
            if requested not in (["sigmoid"], [TRL_LOSS_TYPES[self.method]]):
                raise ValueError(f"method={self.method!r} sets loss_type itself; got loss_type={requested}")
            self.loss_type = [TRL_LOSS_TYPES[self.method]]
        elif self.loss_type not in ("sigmoid", ["sigmoid"]):
            raise ValueError(
                f"method={self.method!r} computes its own loss and ignores loss_type; got loss_type={self.loss_type}"
            )
        self._refuse_ignored_settings()
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha must be >= 0, got {self.cpo_alpha}")
        if self.sparsepo_mask_type not in ("learned", "activation"):
            raise ValueError(f"sparsepo_mask_type must be 'learned' or 'activation', got {self.sparsepo_mask_type!r}")
        if self.sparsepo_activation not in ("mlp", "attn", "residual", "logits"):
            raise ValueError(
                f"sparsepo_activation must be 'mlp', 'attn', 'residual' or 'logits', got {self.sparsepo_activation!r}"
            )
        if self.sparsepo_mask_l1 < 0 or self.sparsepo_mask_weight_decay < 0:
            raise ValueError("sparsepo_mask_l1 and sparsepo_mask_weight_decay must be >= 0")
        if self.sparsepo_chunk_size < 1:
            raise ValueError(f"sparsepo_chunk_size must be >= 1, got {self.sparsepo_chunk_size}")
        if self.displacement_pairs < 0 or self.displacement_steps < 0:
            raise ValueError(
                f"displacement_pairs and displacement_steps must be >= 0, got {self.displacement_pairs}, "
                f"{self.displacement_steps}"
            )
        if self.on_invalid_pairs not in ("drop", "error", "keep"):
            raise ValueError(f"on_invalid_pairs must be 'drop', 'error' or 'keep', got {self.on_invalid_pairs!r}")
        if self.method in ("cpo", "sparsepo") and self.precompute_ref_log_probs:
            raise ValueError(
                f"precompute_ref_log_probs is not supported with method={self.method!r} "
                "(CPO uses no reference; SparsePO needs the reference's full token distributions)"
            )
        if self.bf16 is None and not self.fp16 and not self.use_cpu:
            # TRL turns bf16 on by default, which makes TrainingArguments fail on machines without bf16 support;
            # only do that where it can work.
            import torch

            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        elif self.bf16 is None and self.use_cpu:
            self.bf16 = False
        use_cpu_for_cpu_launch(self)  # torchrun on CPUs: gloo DDP, not N independent copies
        super().__post_init__()

    def _refuse_ignored_settings(self) -> None:
        """Refuse a non-default value of a setting the chosen method (or mask type) never reads."""
        defaults = {f.name: f for f in dataclasses.fields(PreferenceConfig)}

        def changed(name: str) -> bool:
            spec = defaults[name]
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
            return getattr(self, name) != default

        ignored = [name for name, methods in _METHOD_ONLY.items() if self.method not in methods and changed(name)]
        if self.method != "sparsepo":
            ignored += [name for name in defaults if name.startswith("sparsepo_") and changed(name)]
        elif self.sparsepo_mask_type == "activation":
            ignored += [name for name in (*_LEARNED_MASK_ONLY, "sparsepo_mask_learning_rate") if changed(name)]
        elif changed("sparsepo_activation"):
            ignored.append("sparsepo_activation")
        if ignored:
            raise ValueError(
                f"method={self.method!r}"
                + (f" with sparsepo_mask_type={self.sparsepo_mask_type!r}" if self.method == "sparsepo" else "")
                + f" ignores {', '.join(sorted(ignored))}: drop {'it' if len(ignored) == 1 else 'them'}"
            )
