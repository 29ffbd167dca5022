"""Exceptions that mean "the user must change something", shown by the CLI as one line.

Errors cdlm raises on purpose for bad input are ``ValueError``s (or file errors); a missing optional
package is a :class:`MissingDependencyError`. Anything else is a bug or a crash and keeps its traceback.
"""

from __future__ import annotations


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message names the extra to install."""


# What the CLI prints as one line (`cdlm CMD: error: ...`) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    MissingDependencyError,
)
