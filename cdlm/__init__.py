"""cdlm: contrast at decode time and train time for Hugging Face causal language models.

Subpackages:
    cdlm.models        loading real models (hub ids, folders, GGUF, registered names) and amateurs
    cdlm.decoding      contrastive decoding, contrastive search, contrastive input decoding
    cdlm.eval_harness  GSM8K and HellaSwag with every decoding method
    cdlm.alignment     preference and distillation trainers on TRL + PEFT
"""

__version__ = "0.1.0"
