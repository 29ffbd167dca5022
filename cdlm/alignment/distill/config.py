"""``DistiLLM2Config``: the training arguments of :class:`~cdlm.alignment.distill.trainer.DistiLLM2Trainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from cdlm.alignment.parallel import use_cpu_for_cpu_launch
from cdlm.alignment.settings import check_values

LOSS_TYPES = ("distillm2", "cald", "skl", "srkl", "fkl")


@dataclass
class DistiLLM2Config(TrainingArguments):
    """Training arguments for :class:`DistiLLM2Trainer` (all ``TrainingArguments`` fields apply).

    Defaults follow the paper/official release: alpha = 0.1 for both skews, beta = 1/2 (the
    official code's ``(2 - b) SKL + b SRKL`` with b = 1, halved), schedules off.
    """

    # Defaults that differ from TrainingArguments': one pass, small CPU-friendly batches, frequent logs.
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the pairs"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "pairs per device per step"})
    logging_steps: float = field(default=10, metadata={"help": "log every N optimizer steps"})
    loss_type: str = field(default="distillm2", metadata={"help": "objective", "choices": LOSS_TYPES})
    alpha: float = field(default=0.1, metadata={"help": "skew of SKL and SRKL, in (0, 1)"})
    beta: float = field(
        default=0.5, metadata={"help": "weight of SRKL on student responses (initial value), in [0, 1]"}
    )
    beta_schedule: str = field(
        default="constant", metadata={"help": "linear: beta grows over training", "choices": ("constant", "linear")}
    )
    beta_increase: float = field(default=0.5, metadata={"help": "linear schedule: beta gained over the whole run"})
    beta_max: float = field(default=1.0, metadata={"help": "linear schedule: beta is clipped to [beta, beta_max]"})
    adaptive_alpha: bool = field(default=False, metadata={"help": "per-sample alpha curriculum (Algorithm 1)"})
    alpha_min: float = field(default=0.01, metadata={"help": "lower clip of the adaptive alpha"})
    max_length: int | None = field(default=1024, metadata={"help": "truncate prompt+response to this many tokens"})
    chunk_size: int = field(default=256, metadata={"help": "completion positions per logits chunk"})
    reduction: str = field(
        default="sequence",
        metadata={
            "help": "sequence: mean per response, then over the batch; token: over all tokens",
            "choices": ("sequence", "token"),
        },
    )
    resample_student_every_epoch: bool = field(
        default=False, metadata={"help": "on-policy 'batch' mode: regenerate student responses each epoch"}
    )
    resample_max_new_tokens: int = field(default=128)
    resample_temperature: float = field(default=1.0)
    resample_top_p: float = field(default=1.0)
    disable_dropout: bool = field(default=True)
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self) -> None:
        check_values(self)
        use_cpu_for_cpu_launch(self)
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
