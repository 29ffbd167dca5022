"""Train-time contrast on TRL + PEFT, in three families:

- :mod:`cdlm.alignment.preference`: DPO, APO-zero, APO-down, CPO, SparsePO
  (``PreferenceConfig`` + ``PreferenceTrainer``).
- :mod:`cdlm.alignment.distill`: DistiLLM-2 contrastive distillation (``DistiLLM2Config`` + ``DistiLLM2Trainer``).
- :mod:`cdlm.alignment.rl`: PPO with contrastive rewards (``ContrastivePPOConfig`` + ``ContrastivePPOTrainer``)
  and reward functions.

Model-side pieces all three share (EOS ids, prompt rendering, the LM head) live in :mod:`cdlm.models`.
Every public name below is importable from here; its module is imported on first use, so PPO users
never load TRL's DPO machinery.
"""

from cdlm._lazy import lazy_exports

_EXPORTS = {
    # preference optimisation
    "PREFERENCE_METHODS": "cdlm.alignment.preference.config:METHODS",
    "PreferenceConfig": "cdlm.alignment.preference.config",
    "PreferenceTrainer": "cdlm.alignment.preference.trainer",
    "load_sparse_masks": "cdlm.alignment.preference.trainer",
    "load_default_splits": "cdlm.alignment.preference.data",
    "load_preference_dataset": "cdlm.alignment.preference.data",
    "validate_preference_dataset": "cdlm.alignment.preference.data",
    "with_explicit_prompt": "cdlm.alignment.preference.data",
    "CHESSettings": "cdlm.alignment.preference.ches",
    "DisplacementCallback": "cdlm.alignment.preference.displacement",
    # DistiLLM-2
    "DistiLLM2Config": "cdlm.alignment.distill.config",
    "DistiLLM2Trainer": "cdlm.alignment.distill.trainer",
    "distillation_metrics": "cdlm.alignment.distill.metrics",
    "PairGenerationSettings": "cdlm.alignment.distill.pairs",
    "SamplingSettings": "cdlm.alignment.distill.pairs",
    "generate_pairs": "cdlm.alignment.distill.pairs",
    # RL
    "ContrastivePPOConfig": "cdlm.alignment.rl.config",
    "ContrastivePPOTrainer": "cdlm.alignment.rl.trainer",
    "BaselineCache": "cdlm.alignment.rl.baselines",
    "BaselineSettings": "cdlm.alignment.rl.baselines",
    "LazyBaselines": "cdlm.alignment.rl.baselines",
    "generate_baselines": "cdlm.alignment.rl.baselines",
    "ContrastiveReward": "cdlm.alignment.rl.rewards",
    "GSM8KReward": "cdlm.alignment.rl.rewards",
    "SequenceClassificationReward": "cdlm.alignment.rl.rewards",
    "as_trl_reward_func": "cdlm.alignment.rl.rewards",
    "load_reward": "cdlm.alignment.rl.rewards",
    "train_reward_model": "cdlm.alignment.rl.reward_model",
    "arithmetic_problems": "cdlm.alignment.rl.problems",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
