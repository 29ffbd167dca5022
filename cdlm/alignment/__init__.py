"""Preference and distillation trainers built on TRL and PEFT."""

# DistiLLM-2 contrastive distillation (helper-5 area).
from cdlm.alignment.distillm2 import DistiLLM2Config, DistiLLM2Trainer, distillation_metrics  # noqa: E402
from cdlm.alignment.distill_data import PairGenerationSettings, SamplingSettings, generate_pairs  # noqa: E402

# Preference optimisation: DPO, APO-zero, APO-down, CPO, SparsePO (helper-4 area).
from cdlm.alignment.config import METHODS as PREFERENCE_METHODS, PreferenceConfig  # noqa: E402
from cdlm.alignment.data import load_default_splits, load_preference_dataset, validate_preference_dataset  # noqa: E402
from cdlm.alignment.trainer import PreferenceTrainer, load_sparse_masks  # noqa: E402

# PPO with contrastive rewards (helper-6 area).
from cdlm.alignment.baselines import BaselineCache, BaselineSettings, generate_baselines  # noqa: E402
from cdlm.alignment.ppo import ContrastivePPOConfig, PPOConfig, PPOTrainer  # noqa: E402
from cdlm.alignment.rewards import (  # noqa: E402
    ContrastiveReward,
    GSM8KReward,
    SequenceClassificationReward,
    as_trl_reward_func,
    load_reward,
    train_reward_model,
)
