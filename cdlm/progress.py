"""Progress for long work (training, evaluation, scoring, generating many prompts), one behaviour everywhere.

On a terminal: a tqdm bar with ETA on stderr. Otherwise (a log file, a pipe, a CI job) a bar's carriage
returns make an unreadable log, so a plain status line ``what: done/total (pct), rate, ETA`` is printed
every ``interval`` seconds and once at the end. Only the main process reports (``RANK`` 0 under
torchrun/accelerate), since N ranks would print everything N times. ``set_quiet(True)`` (the CLI's
``--quiet``) silences all of it, process-wide. No torch import: any layer may use this module.

    with progress.track(len(prompts), "generating", unit="prompt") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

STATUS_INTERVAL = 30.0  # seconds between status lines when stderr is not a terminal

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar, status line and :func:`message` of this process."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain run): the one process that reports and writes."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def enabled() -> bool:
    """Whether this process reports progress: the main process, not quiet."""
    return not _quiet and is_main_process()


def message(text: str, *, stream: IO[str] | None = None) -> None:
    """One progress line on stderr, from the main process only, unless quiet."""
    if enabled():
        print(text, file=stream if stream is not None else sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for a status line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Tracker:
    """Counts finished work; reports it as a bar (terminal) or periodic status lines (anything else)."""

    def __init__(
        self,
        total: int | None,
        description: str,
        *,
        unit: str = "it",
        stream: IO[str] | None = None,
        interval: float = STATUS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
        initial: int = 0,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError(f"progress total must be >= 0, got {total}")
        self.total = total
        self.description = description
        self.unit = unit
        self.done = initial
        self._initial = initial
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._last_report = self._started
        self._closed = False
        self._reported: int | None = None
        self._bar: Any = None
        self._active = enabled()
        if terminal is None:
            isatty = getattr(self._stream, "isatty", None)
            terminal = bool(isatty and isatty())
        if self._active and terminal:
            from tqdm.auto import tqdm

            # disable=False: the CLI sets TQDM_DISABLE to quiet *library* bars; this bar is cdlm's own.
            self._bar = tqdm(
                total=total, desc=description, unit=unit, file=self._stream, initial=initial, disable=False
            )

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""
        self.done += n
        if not self._active or self._closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last_report >= self._interval:
            self._last_report = now
            self._reported = self.done
            self._write(self.status(now))

    def status(self, now: float | None = None) -> str:
        """``what: done/total (pct), rate unit/s, ETA``: the line printed when stderr is not a terminal."""
        elapsed = (self._clock() if now is None else now) - self._started
        fresh = self.done - self._initial
        rate = fresh / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}: {self.done}"]
        if self.total is not None:
            percent = 100.0 * self.done / self.total if self.total else 100.0
            parts[0] += f"/{self.total} ({percent:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:.1f} {self.unit}/s")
        if self.total is not None and rate > 0 and self.done < self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        return ", ".join(parts)

    def close(self) -> None:
        """Final report: the bar closes; otherwise one last status line, so a log always shows the end."""
        if self._closed:
            return
        self._closed = True
        if not self._active:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._reported != self.done:  # the last periodic line already shows the end
            self._write(self.status())

    def _write(self, line: str) -> None:
        print(line, file=self._stream, flush=True)


@contextmanager
def track(total: int | None, description: str, **options: Any) -> Iterator[Tracker]:
    """A :class:`Tracker` that closes (prints its final line) when the block ends, even on error."""
    tracker = Tracker(total, description, **options)
    try:
        yield tracker
    finally:
        tracker.close()
