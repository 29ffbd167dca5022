"""Decoding methods as drop-in pieces of ``transformers``' ``generate()``.

The method registry (``cdlm.decoding.methods``) names every method for the CLI and eval harness;
the processors and callables themselves live in their own modules.
"""

from cdlm.decoding.methods import DecodingMethod, Param, available_methods, get_method
from cdlm.decoding.runner import Generation, GenerationStats, generate

__all__ = ["DecodingMethod", "Generation", "GenerationStats", "Param", "available_methods", "generate", "get_method"]
