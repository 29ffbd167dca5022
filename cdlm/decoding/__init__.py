"""Decoding methods as drop-in pieces of ``transformers``' ``generate()``.

The method registry (``cdlm.decoding.methods``) names every method for the CLI and eval harness;
the processors and callables themselves live in their own modules.
"""

from cdlm.decoding.contrastive_decoding import (
    ContrastiveDecodingLogitsProcessor,
    EarlyExitContrastiveLogitsProcessor,
)
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
# `cdlm.decoding.contrastive_search` is a callable module, so it can be passed as `custom_generate`.
from cdlm.decoding import contrastive_search
from cdlm.decoding.contrastive_search import contrastive_search_generate
from cdlm.decoding.methods import DecodingMethod, Param, available_methods, get_method
from cdlm.decoding.runner import Generation, GenerationStats, generate

__all__ = [
    "ContrastiveDecodingLogitsProcessor",
    "ContrastiveInputLogitsProcessor",
    "EarlyExitContrastiveLogitsProcessor",
    "contrastive_search",
    "contrastive_search_generate",
    "DecodingMethod",
    "Generation",
    "GenerationStats",
    "Param",
    "available_methods",
    "generate",
    "get_method",
]
