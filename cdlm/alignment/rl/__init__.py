"""RL with contrastive rewards: PPO built from transformers/PEFT parts, and reward functions.

``core.py`` (GAE, whitening, clipped losses: pure tensor maths), ``rollout.py`` (sampling responses),
``rewards.py`` (rule, learned and contrastive rewards in TRL's reward-function signature),
``reward_model.py`` (training a reward model), ``baselines.py`` (the offline baseline responses of
contrastive rewards), ``problems.py`` (synthetic verifiable prompts), ``config.py`` (``ContrastivePPOConfig``),
``trainer.py`` (``ContrastivePPOTrainer``, data-parallel through accelerate).
"""
