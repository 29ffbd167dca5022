"""Evaluate any cdlm decoding method on lm-evaluation-harness-style tasks (GSM8K, HellaSwag, ...).

* ``evaluate(loaded, method, EvalConfig(task=...), output_dir)``: one task, one method, resumable,
  data-parallel under ``torchrun``.
* ``task``: the task interface (``Task``, requests, responses, ``ScoringRule``) and the task registry;
  the built-in tasks are one module each in ``tasks/`` (``gsm8k``, ``gsm8k_cot``, ``hellaswag``).
* ``scoring``: continuation log-likelihoods with one shared context pass per example (+ contrastive).
* ``lm_eval_model``: cdlm as an lm-evaluation-harness model; ``lm_eval_cli`` is ``cdlm-lm-eval`` (lm-eval's
  command line with that model and the packaged offline tasks of ``lm_eval_tasks``).
* ``isotropy``: per-layer self-similarity of a model's token representations (``cdlm isotropy``).

Run folders (``run.json``, ``samples.jsonl``, atomic writes) live in ``cdlm.runs``, shared with CHES scoring.
"""

from cdlm.eval_harness.evaluate import EvalConfig, evaluate, prepare
from cdlm.eval_harness.task import Task, get_task, register_task, task_names

__all__ = ["EvalConfig", "Task", "evaluate", "get_task", "prepare", "register_task", "task_names"]
