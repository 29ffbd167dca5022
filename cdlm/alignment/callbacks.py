"""Trainer callbacks every cdlm trainer command uses: stop on non-finite training, report progress.

A too-high learning rate or a degenerate objective makes the weights NaN within a step; Trainer keeps
going and saves them, and the run "succeeds". :class:`StopOnNonFinite` (a ``TrainerCallback``, used by
every cdlm trainer) checks the trainable weights after each optimizer step, before any checkpoint of
that step is written, and every logged loss, and raises :class:`NonFiniteTrainingError`.
:class:`TrainingProgress` reports steps with ETA through :mod:`cdlm.progress` (a bar on a terminal, status
lines in a log; silent under ``--quiet``), plus one line per logged loss.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from cdlm import progress


class NonFiniteTrainingError(ValueError):
    """Training produced a NaN/inf loss or weight; the checkpoints written before it are finite."""


_WATCHED_LOGS = ("loss", "train_loss", "loss/policy", "loss/value")


class StopOnNonFinite(TrainerCallback):
    """Raise :class:`NonFiniteTrainingError` at the first step whose trainable weights or logged loss are NaN/inf."""

    def __init__(self, extra_modules: tuple[torch.nn.Module, ...] = ()):
        self.extra_modules = extra_modules

    def on_step_end(self, args, state, control, model=None, **kwargs):
        modules = ([model] if model is not None else []) + list(self.extra_modules)
        with torch.no_grad():
            for module in modules:
                for name, parameter in module.named_parameters():
                    if parameter.requires_grad and not bool(torch.isfinite(parameter).all()):
                        raise NonFiniteTrainingError(
                            f"training stopped at step {state.global_step}: weight {name} is no longer finite "
                            f"(NaN/inf; learning_rate={args.learning_rate} may be too high); nothing of this step "
                            "was saved"
                        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in _WATCHED_LOGS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteTrainingError(
                    f"training stopped at step {state.global_step}: {key} is {value} (NaN/inf); "
                    "check the learning rate and the data"
                )


class TrainingProgress(TrainerCallback):
    """Optimizer steps done / planned with rate and ETA (:mod:`cdlm.progress`), and each logged loss as a line."""

    def __init__(self, description: str = "training"):
        self.description = description
        self.tracker: progress.Tracker | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        total = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self.tracker = progress.Tracker(total, self.description, unit="step", initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.update(state.global_step - self.tracker.done)

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: v for k, v in (logs or {}).items() if k in ("loss", "eval_loss", "grad_norm", "learning_rate")}
        if shown:
            values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            progress.message(f"step {state.global_step}/{state.max_steps}: {values}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
