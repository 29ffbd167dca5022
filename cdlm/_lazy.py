"""Lazy public names for package ``__init__`` modules.

``cdlm.alignment`` re-exports trainers whose modules import TRL, PEFT and torch; importing them only
when a name is first used keeps ``import cdlm.alignment.rl`` free of TRL and ``cdlm --help`` fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``.

    ``exports`` maps a public name to the module defining it, or to ``"module:attribute"`` where the
    public name differs from the module's own.
    """

    def __getattr__(name: str) -> object:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module, _, attribute = module.partition(":")
        value = getattr(importlib.import_module(module), attribute or name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
