"""Decoding methods as drop-in pieces of ``transformers``' ``generate()``.

- ``contrast``: the contrast rule of CD and CID (formulations, defaults, validation, ``ContrastSettings``).
- ``contrastive_decoding`` / ``contrastive_input``: their ``LogitsProcessor`` classes; ``branch``: the
  KV-cached second branch (amateur or contrastive input) those processors share.
- ``contrastive_search`` and ``dola``: callable modules, passed to ``generate()`` as ``custom_generate``.
- ``methods``: the registry naming every method for the CLI, eval harness and benchmarks;
  ``runner``: batched generation with any registered method.

Public names are imported on first use, so ``import cdlm.decoding.methods`` (the CLI's registry) does
not import torch or transformers.
"""

import importlib

from cdlm._lazy import lazy_exports

_EXPORTS = {
    "ContrastSettings": "cdlm.decoding.contrast",
    "ContrastiveDecodingLogitsProcessor": "cdlm.decoding.contrastive_decoding",
    "EarlyExitContrastiveLogitsProcessor": "cdlm.decoding.contrastive_decoding",
    "contrastive_decoding_processor": "cdlm.decoding.contrastive_decoding",
    "ContrastiveInputLogitsProcessor": "cdlm.decoding.contrastive_input",
    "contrastive_search_generate": "cdlm.decoding.contrastive_search",
    "dola_generate": "cdlm.decoding.dola",
    "DecodingMethod": "cdlm.decoding.methods",
    "available_methods": "cdlm.decoding.methods",
    "get_method": "cdlm.decoding.methods",
    "Generation": "cdlm.decoding.runner",
    "GenerationStats": "cdlm.decoding.runner",
    "generate": "cdlm.decoding.runner",
}
# Callable modules (``custom_generate=cdlm.decoding.contrastive_search``), exported as modules.
_MODULES = ("contrastive_search", "dola")
__all__ = sorted([*_EXPORTS, *_MODULES])
_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> object:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    return _getattr(name)
