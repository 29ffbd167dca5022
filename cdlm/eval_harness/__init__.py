"""GSM8K and HellaSwag evaluation with every cdlm decoding method, in lm-evaluation-harness 0.4.x's formats.

* ``evaluate(loaded, method, EvalConfig(task=...), output_dir)``: one task, one method, resumable.
* ``scoring``: continuation log-likelihoods with one shared context pass per example (+ contrastive).
* ``gsm8k`` / ``hellaswag``: prompts, preprocessing and metrics matching lm-eval.
"""

from cdlm.eval_harness.evaluate import TASKS, EvalConfig, evaluate

__all__ = ["TASKS", "EvalConfig", "evaluate"]
