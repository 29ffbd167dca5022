"""One way to read line-oriented files in cdlm: lines end at ``"\\n"`` only, bad lines are named ``file:LINE``.

``str.splitlines()`` also breaks at U+2028, U+2029, U+0085, form feeds and other separators. JSON written
with ``ensure_ascii=False`` keeps those characters raw inside strings, so ``splitlines()`` tears a record
in two, and a prompt containing a form feed becomes two prompts. Every reader of prompts, texts, jsonl
data and run records goes through this module, so they all split, decode and report alike. Streams
(``/dev/stdin``, pipes, process substitution) are read like files. No torch, no third-party imports.
"""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path
from typing import Any


class MalformedRowError(ValueError):
    """A data line or row is unusable: not UTF-8, not JSON, not an object, or lacking a field the task needs."""


def split_lines(text: str) -> list[str]:
    """``text`` split at ``"\\n"`` only (a trailing ``"\\r"`` is dropped); no empty last line for a final newline."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _check_readable(path: Path, what: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
        raise ValueError(f"{what} {path} is not a readable file")


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of a file or stream (``/dev/stdin``, a pipe), gunzipped when the name ends in ``.gz``."""
    path = Path(path)
    _check_readable(path, what)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, OSError) as error:
            raise MalformedRowError(f"{what} {path} is not a readable gzip file ({error})") from None
    return data


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedRowError(
            f"{path}:{number} is not UTF-8 text (byte {error.object[error.start]:#04x} at column {error.start + 1})"
        ) from None


def read_lines(path: str | Path, what: str = "file") -> list[tuple[int, str]]:
    """``(file line number, text)`` for every line of a UTF-8 file or stream, blank lines included."""
    path = Path(path)
    raw_lines = read_bytes(path, what).split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, 1):
        text = _decode(raw, path, number)
        lines.append((number, text[:-1] if text.endswith("\r") else text))
    return lines


def read_text_lines(path: str | Path, what: str = "file") -> list[str]:
    """The non-blank lines of a UTF-8 text file or stream (one prompt / text per line)."""
    return [text for _, text in read_lines(path, what) if text.strip()]


def parse_json_line(text: str, path: str | Path, number: int) -> dict[str, Any]:
    """One jsonl line as a JSON object, or a ``MalformedRowError`` naming ``file:LINE``."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedRowError(f"{path}:{number} is not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise MalformedRowError(f"{path}:{number} is not a JSON object (got {type(row).__name__})")
    return row


def read_jsonl_numbered(path: str | Path, what: str = "data file") -> list[tuple[int, dict[str, Any]]]:
    """``(file line number, row)`` for every non-blank line of a ``.jsonl`` / ``.jsonl.gz`` file.

    Keep the numbers when rows are validated later, so a message names the line a user can open.
    """
    return [(number, parse_json_line(text, path, number)) for number, text in read_lines(path, what) if text.strip()]


def read_jsonl(path: str | Path, what: str = "data file") -> list[dict[str, Any]]:
    """The rows (JSON objects) of a ``.jsonl`` / ``.jsonl.gz`` file or stream."""
    return [row for _, row in read_jsonl_numbered(path, what)]


def dumps_line(row: Any) -> str:
    """One jsonl line (no newline): UTF-8 as is, every line separator escaped, so any reader sees one line."""
    text = json.dumps(row, ensure_ascii=False)
    # json.dumps escapes "\n" but leaves U+2028/U+2029/U+0085 raw; escaped they read back identically.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\u0085", "\\u0085")
