"""cdlm.progress: status lines when stderr is not a terminal, nothing when quiet or not rank 0."""

from __future__ import annotations

import io

import pytest

from cdlm import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _loud(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def run_ten(stream, clock, **options):
    with progress.track(10, "generating", unit="prompt", stream=stream, clock=clock, interval=30, **options) as bar:
        for step in range(10):
            clock.now += 10  # one prompt every 10 s: a status line every third prompt
            bar.update()
            assert bar.done == step + 1


def test_non_terminal_prints_periodic_status_lines_with_eta():
    stream, clock = io.StringIO(), FakeClock()
    run_ten(stream, clock)
    assert stream.getvalue().splitlines() == [
        "generating: 3/10 (30%), 0.10 prompt/s, ETA 1m10s, elapsed 30s",
        "generating: 6/10 (60%), 0.10 prompt/s, ETA 40s, elapsed 1m00s",
        "generating: 9/10 (90%), 0.10 prompt/s, ETA 10s, elapsed 1m30s",
        "generating: 10/10 (100%), 0.10 prompt/s, elapsed 1m40s",
    ]


def test_quiet_prints_nothing():
    stream, clock = io.StringIO(), FakeClock()
    progress.set_quiet(True)
    run_ten(stream, clock)
    progress.message("loaded", stream=stream)
    assert stream.getvalue() == ""


def test_only_rank_zero_reports(monkeypatch):
    stream, clock = io.StringIO(), FakeClock()
    monkeypatch.setenv("RANK", "1")
    run_ten(stream, clock)
    progress.message("loaded", stream=stream)
    assert stream.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    progress.message("loaded", stream=stream)
    assert stream.getvalue() == "loaded\n"


def test_terminal_uses_a_bar_that_ignores_tqdm_disable(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # the CLI's switch for library bars must not hide cdlm's own
    stream, clock = io.StringIO(), FakeClock()
    run_ten(stream, clock, terminal=True)
    text = stream.getvalue()
    assert "\r" in text and "10/10" in text and "generating" in text


def test_unknown_total_and_duration_format():
    stream, clock = io.StringIO(), FakeClock()
    with progress.track(None, "scoring", stream=stream, clock=clock) as bar:
        clock.now += 4
        bar.update(8)
    assert stream.getvalue() == "scoring: 8, 2.00 it/s, elapsed 4s\n"
    assert [progress.format_duration(s) for s in (0, 59.4, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]


def test_cli_quiet_flag_sets_the_switch():
    from cdlm.cli import build_parser
    from cdlm.cli.common import apply_runtime_arguments

    args = build_parser().parse_args(["generate", "--prompt", "x", "--quiet"])
    apply_runtime_arguments(args)
    assert progress.is_quiet()
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    apply_runtime_arguments(args)
    assert not progress.is_quiet()
    args = build_parser().parse_args(["generate", "--prompt", "x", "--quiet", "--verbose"])
    with pytest.raises(ValueError, match="--quiet and --verbose"):
        apply_runtime_arguments(args)


def test_the_end_is_reported_once():
    """A periodic line that already shows the last unit is not repeated by the closing line."""
    stream, clock = io.StringIO(), FakeClock()
    with progress.track(3, "generating", unit="prompt", stream=stream, clock=clock, interval=30) as bar:
        clock.now += 90
        bar.update(3)
    assert stream.getvalue().splitlines() == ["generating: 3/3 (100%), 0.03 prompt/s, elapsed 1m30s"]
