"""``LoraArguments``: the LoRA settings every trainer command shares (one home for their names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraArguments:
    """How to wrap the trained model in a PEFT LoRA adapter; ``lora_r = 0`` trains all weights instead."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 trains all weights (no adapter)"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 x lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "'all-linear' or comma-separated module names, e.g. q_proj,v_proj"}
    )

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 trains all weights), got {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        """A ``peft.LoraConfig``, or None when ``lora_r`` is 0 (full training)."""
        if self.lora_r == 0:
            return None
        from peft import LoraConfig

        targets: str | list[str] = self.lora_target_modules
        if targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha or 2 * self.lora_r,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            task_type=task_type,
        )
