"""Loading causal LMs (registered names, GGUF files, folders, hub ids) and contrastive amateurs."""

from cdlm.models.amateur import (
    CannotSplitModelError,
    EarlyExitAmateur,
    SeparateAmateur,
    TokenizerMismatchError,
    check_same_vocabulary,
    make_separate_amateur,
)
from cdlm.models.cache import cache_root
from cdlm.models.loading import LoadedModel, load_amateur, load_model, resolve_device, resolve_dtype
from cdlm.models.registry import DEFAULT_MODEL, REGISTRY, UnknownModelError

Amateur = SeparateAmateur | EarlyExitAmateur

__all__ = [
    "Amateur",
    "CannotSplitModelError",
    "DEFAULT_MODEL",
    "EarlyExitAmateur",
    "LoadedModel",
    "REGISTRY",
    "SeparateAmateur",
    "TokenizerMismatchError",
    "UnknownModelError",
    "cache_root",
    "check_same_vocabulary",
    "load_amateur",
    "load_model",
    "make_separate_amateur",
    "resolve_device",
    "resolve_dtype",
]
