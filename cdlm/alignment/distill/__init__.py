"""DistiLLM-2 contrastive distillation (Ko et al., ICML 2025).

``pairs.py`` (generating and reading teacher/student response pairs), ``dataset.py`` (tokenised
pairs and the collator), ``losses.py`` (skew KL / reverse KL, chunked over positions), ``config.py``
(``DistiLLM2Config``), ``trainer.py`` (``DistiLLM2Trainer``), ``metrics.py`` (held-out agreement).
"""
