"""Likelihood-displacement monitoring: how far the chosen and rejected log-probabilities drifted since step 0.

DPO-like objectives widen the chosen-rejected margin, often while *both* log-probabilities fall (Razin et al.,
"Unintentional Unalignment", ICLR 2025); the training logs' ``logps/chosen`` are batch values of changing batches,
so that drift is invisible in them. :class:`DisplacementCallback` scores a fixed set of pairs at step 0 and at every
logging step (or every ``displacement_steps``), and logs, over those pairs:

* ``displacement/chosen_logps_change``: mean of :math:`\\log\\pi_t(y^+|x) - \\log\\pi_0(y^+|x)`;
* ``displacement/rejected_logps_change``: the same for the rejected replies;
* ``displacement/chosen_decreased_fraction``: fraction of pairs whose chosen log-probability fell.

Log-probabilities are sequence sums over the reply tokens, computed as the trainer computes them, in eval mode
(no dropout). Every process scores all monitored pairs, so the numbers do not depend on the number of processes.
The step-0 values are written into each checkpoint (``displacement_reference.json``) and read back on resume, so a
resumed run keeps measuring from the true step 0; a resumed checkpoint without them is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import TrainerCallback

REFERENCE_FILE = "displacement_reference.json"
METRIC_KEYS = (
    "displacement/chosen_logps_change",
    "displacement/rejected_logps_change",
    "displacement/chosen_decreased_fraction",
)
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def displacement_metrics(initial: torch.Tensor, current: torch.Tensor) -> dict[str, float]:
    """The logged numbers from ``(N, 2)`` chosen/rejected sequence log-probabilities at step 0 and now."""
    change = current.double() - initial.double()
    return {
        METRIC_KEYS[0]: float(change[:, 0].mean()),
        METRIC_KEYS[1]: float(change[:, 1].mean()),
        METRIC_KEYS[2]: float((change[:, 0] < 0).double().mean()),
    }


def _fingerprint(dataset: Dataset, args: Any) -> str:
    """Identity of what is measured: the pairs' token ids and the collator's truncation."""
    digest = hashlib.sha256(f"{args.max_length}:{args.truncation_mode}\n".encode())
    for row in dataset:
        digest.update(json.dumps([row[c] for c in TOKEN_COLUMNS]).encode())
    return "sha256:" + digest.hexdigest()


class DisplacementCallback(TrainerCallback):
    """Logs the drift of chosen/rejected log-probabilities on ``pairs`` (tokenised: prompt/chosen/rejected ids).

    Attached by :class:`~cdlm.alignment.PreferenceTrainer` when ``displacement_pairs > 0``; the metrics go through
    the trainer's own metric buffer, so they appear in ``log_history`` and every ``report_to`` logger next to the loss.
    """

    def __init__(self, trainer: Any, pairs: Dataset, every: int = 0, batch_size: int = 8):
        missing = [c for c in TOKEN_COLUMNS if c not in pairs.column_names]
        if missing:
            raise ValueError(f"displacement pairs must be tokenised; missing {missing}")
        if len(pairs) == 0:
            raise ValueError("displacement monitoring needs at least one pair")
        self.trainer = trainer
        self.pairs = pairs.select_columns(list(TOKEN_COLUMNS))
        self.every = every
        self.batch_size = batch_size
        self.fingerprint = _fingerprint(self.pairs, trainer.args)
        self.initial: torch.Tensor | None = None
        self.last: dict[str, float] | None = None

    @torch.no_grad()
    def sequence_logps(self) -> torch.Tensor:
        """``(N, 2)`` float64 chosen/rejected log-probabilities of the monitored pairs under the current policy."""
        trainer = self.trainer
        loader = DataLoader(self.pairs, batch_size=self.batch_size, collate_fn=trainer.data_collator, shuffle=False)
        model = trainer.model
        was_training = model.training
        model.eval()
        out = []
        try:
            for batch in loader:
                batch = trainer._prepare_inputs(batch)
                out.append(torch.stack(trainer._sequence_logps(model, batch), -1).double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        if self.initial is None:
            if state.global_step > 0:
                raise ValueError(
                    f"resuming at step {state.global_step} without the step-0 displacement reference "
                    f"({REFERENCE_FILE} in the checkpoint); set displacement_pairs=0 to resume without monitoring"
                )
            self.initial = self.sequence_logps()

    def on_step_end(self, args, state, control, **kwargs):
        due = control.should_log if self.every <= 0 else state.global_step % self.every == 0
        if not due or self.initial is None:
            return
        self.last = displacement_metrics(self.initial, self.sequence_logps())
        # DPOTrainer averages this buffer into the next log entry (as it does its own batch metrics) and clears it.
        buffer = self.trainer._metrics["train"]
        for key, value in self.last.items():
            buffer[key].append(value)

    def on_save(self, args, state, control, **kwargs):
        if self.initial is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.save(folder)

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: str) -> None:
        payload = {"pairs": self.fingerprint, "initial_logps": self.initial.tolist()}
        with open(os.path.join(folder, REFERENCE_FILE), "w") as handle:
            json.dump(payload, handle)

    def restore(self, folder: str) -> None:
        """Read the step-0 values from a checkpoint written by this callback (same monitored pairs, or refused)."""
        path = os.path.join(folder, REFERENCE_FILE)
        if not os.path.exists(path):
            return  # on_train_begin refuses to measure from the resumed weights
        with open(path) as handle:
            payload = json.load(handle)
        if payload["pairs"] != self.fingerprint:
            raise ValueError(
                f"{path} was measured on other displacement pairs than this run's (changed data, max_length or "
                "displacement_pairs); resume with the same settings or set displacement_pairs=0"
            )
        self.initial = torch.tensor(payload["initial_logps"], dtype=torch.float64)


def attach_displacement_monitor(trainer: Any) -> DisplacementCallback | None:
    """Add a :class:`DisplacementCallback` to ``trainer`` as its config asks (``displacement_pairs``) and return it.

    The monitored pairs are the first ``displacement_pairs`` of the (tokenised) eval set, or of the first eval set
    of a dict, else of the training set.
    """
    args = trainer.args
    count = getattr(args, "displacement_pairs", 0)
    if not count:
        return None
    source = trainer.eval_dataset
    if isinstance(source, dict):
        source = next(iter(source.values()), None)
    if not isinstance(source, Dataset) or len(source) == 0:
        source = trainer.train_dataset
    if not isinstance(source, Dataset) or len(source) == 0:
        return None  # an iterable dataset: no fixed set to measure on
    pairs = source.select(range(min(count, len(source))))
    callback = DisplacementCallback(
        trainer, pairs, every=args.displacement_steps, batch_size=args.per_device_eval_batch_size
    )
    trainer.add_callback(callback)
    return callback


__all__ = [
    "DisplacementCallback",
    "attach_displacement_monitor",
    "METRIC_KEYS",
    "REFERENCE_FILE",
    "displacement_metrics",
]
