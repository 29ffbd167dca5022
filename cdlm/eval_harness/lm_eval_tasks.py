"""The parts of cdlm's lm-eval integration that need no lm-eval: the task templates for the packaged data
(rendered into an ``--include_path`` folder), the install check and the device fallback.

See ``cdlm.eval_harness.lm_eval_cli`` for the tasks and the command that uses them; no lm-eval import
here, so a missing ``lmeval`` extra is one line and these parts are tested without it.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path
from typing import Mapping

from cdlm.errors import MissingDependencyError

INSTALL_HINT = "pip install 'cdlm[lmeval]'"
# template placeholder -> packaged data set (cdlm.eval_harness.data.PACKAGED)
PLACEHOLDERS = {
    "__HELLASWAG__": "hellaswag/validation",
    "__DATA__": "hellaswag/validation_olmo1000",
    "__TRAIN__": "gsm8k/train",
    "__TEST__": "gsm8k/test",
}
TASK_NAMES = ("cdlm_hellaswag", "cdlm_hellaswag_processed", "cdlm_gsm8k")


def templates_dir() -> Path:
    return Path(str(resources.files("cdlm") / "data" / "lm_eval_tasks"))


def write_task_dir(target: str | Path, replacements: Mapping[str, str | Path] | None = None) -> Path:
    """Render the task templates into ``target`` (an lm-eval ``--include_path``) and return it.

    ``replacements`` overrides placeholders or other text (e.g. another data file for ``__DATA__``);
    placeholders not given point at the packaged data. Files are rewritten atomically, so concurrent
    runs never read half a YAML.
    """
    from cdlm.eval_harness.data import packaged_path
    from cdlm.runs import atomic_write_text

    values = {key: str(packaged_path(name)) for key, name in PLACEHOLDERS.items()}
    values.update({key: str(value) for key, value in (replacements or {}).items()})
    target = Path(target)
    for source in sorted(templates_dir().iterdir()):
        if source.suffix not in (".yaml", ".py"):
            continue
        text = source.read_text(encoding="utf-8")
        if source.suffix == ".yaml":
            for key, value in values.items():
                text = text.replace(key, value)
        atomic_write_text(target / source.name, text)
    return target


def packaged_task_dir() -> Path:
    """The rendered packaged tasks, in cdlm's cache folder (rewritten on every call: it costs milliseconds)."""
    from cdlm.models.cache import cache_root

    return write_task_dir(cache_root() / "lm_eval_tasks")


def check_lm_eval() -> None:
    """``MissingDependencyError`` naming the extra when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"lm-eval is not installed: {INSTALL_HINT}") from None


def available_device(device: str | None) -> str:
    """``device``, or ``cpu`` with a warning when it names CUDA on a machine without it (lm-eval's default
    is ``cuda:0``; its ``hf`` model falls back the same way)."""
    import torch

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} was requested but CUDA is not available: running on the CPU", stacklevel=2)
        return "cpu"
    return device or "auto"
