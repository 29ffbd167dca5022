"""``cdlm-lm-eval``: lm-eval's own command line with the ``cdlm`` model and cdlm's packaged tasks, offline.

    pip install 'cdlm[lmeval]'
    cdlm-lm-eval --model cdlm --model_args pretrained=smollm2-135m-instruct,method=cd,amateur=early-exit:8 \\
        --tasks cdlm_hellaswag --limit 100

The task YAMLs for the packaged data (``cdlm/data/lm_eval_tasks``: ``cdlm_hellaswag``, the 10,042 packaged
validation rows rendered as lm-eval's ``hellaswag``; ``cdlm_hellaswag_processed``, the 1,000 already
rendered ``validation_olmo1000`` rows; ``cdlm_gsm8k``, lm-eval's ``gsm8k`` on the packaged train/test
split) are templates: their data paths are filled in and the result written to a folder in cdlm's
cache, which is passed as ``--include_path`` unless the command gives its own (lm-eval takes one).
lm-eval's hub tasks (``hellaswag``, ``gsm8k``) need the network; these do not.

This module imports lm-eval only in ``main``, so a missing ``lmeval`` extra is one line, not a traceback.
The templates and their rendering live in ``cdlm.eval_harness.lm_eval_tasks``.
"""

from __future__ import annotations

import sys

from cdlm.errors import USER_ERRORS
from cdlm.eval_harness.lm_eval_tasks import check_lm_eval, packaged_task_dir


def lm_eval_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--include_path`` pointing at the packaged tasks, unless the user gave one."""
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return list(argv)
    return [*argv, "--include_path", str(packaged_task_dir())]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI (``lm_eval.__main__.cli_evaluate``) with the ``cdlm`` model registered and cdlm's tasks."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        check_lm_eval()
        if not any(arg in ("-h", "--help") for arg in args):
            args = lm_eval_argv(args)
        from lm_eval.__main__ import cli_evaluate

        import cdlm.eval_harness.lm_eval_model  # noqa: F401  (registers the `cdlm` model)

        sys.argv = [sys.argv[0], *args]
        cli_evaluate()
    except USER_ERRORS as error:
        print(f"cdlm-lm-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
