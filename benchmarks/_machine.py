"""One honest line about the machine a benchmark ran on.

Why: timings on a 2-core box mean little without knowing whether other jobs competed for the
cores, so every results file records the load average seen when the run started instead of a
hand-written guess.
"""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """Architecture, core count, torch version and the 1-minute load average at the time of the call."""
    try:
        import torch

        torch_part = f", torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    except ImportError:  # the lm-eval side runs in its own venv
        torch_part = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()} CPU, {os.cpu_count()} cores{torch_part}, load average {load:.2f} at start"
