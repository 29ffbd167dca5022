"""Preference optimisation on TRL's ``DPOTrainer``: DPO, APO-zero, APO-down, CPO and SparsePO.

``config.py`` (``PreferenceConfig``), ``data.py`` (datasets and validation), ``losses.py`` (CPO,
SparsePO and the chunked log-prob maths), ``sparsepo.py`` (token masks), ``trainer.py``.
"""
