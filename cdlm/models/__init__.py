"""Loading causal LMs (registered names, GGUF files, folders, hub ids) and contrastive amateurs.

Model-side helpers with one home each, shared by decoding, eval and alignment:

- ``loading``: ``load_model`` / ``load_amateur``; ``cache``: the dequantised-GGUF cache; ``registry``: named models.
- ``amateur``: separate and early-exit amateurs, vocabulary checks, the ``early-exit:N`` spec parser.
- ``lm_head``: the output head applied by hand (lm_head, ``logit_scale``/``logits_scaling``, final
  soft-capping) and the chunked head loop.
- ``prompts``: chat-template rendering, EOS ids, context-length checks.

Public names are imported on first use: ``import cdlm.models.registry`` (the CLI) loads no torch.
"""

from cdlm._lazy import lazy_exports

_EXPORTS = {
    "Amateur": "cdlm.models.amateur",
    "CannotSplitModelError": "cdlm.models.amateur",
    "EarlyExitAmateur": "cdlm.models.amateur",
    "SeparateAmateur": "cdlm.models.amateur",
    "TokenizerMismatchError": "cdlm.models.amateur",
    "check_bare_amateur": "cdlm.models.amateur",
    "check_same_vocabulary": "cdlm.models.amateur",
    "early_exit_spec": "cdlm.models.amateur",
    "make_separate_amateur": "cdlm.models.amateur",
    "parse_early_exit": "cdlm.models.amateur",
    "LogitTransform": "cdlm.models.lm_head",
    "head_logits": "cdlm.models.lm_head",
    "eos_token_ids": "cdlm.models.prompts",
    "render_prompts": "cdlm.models.prompts",
    "cache_root": "cdlm.models.cache",
    "LoadedModel": "cdlm.models.loading",
    "load_amateur": "cdlm.models.loading",
    "load_model": "cdlm.models.loading",
    "resolve_device": "cdlm.models.loading",
    "resolve_dtype": "cdlm.models.loading",
    "DEFAULT_MODEL": "cdlm.models.registry",
    "REGISTRY": "cdlm.models.registry",
    "UnknownModelError": "cdlm.models.registry",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
