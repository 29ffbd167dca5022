"""Preference and distillation trainers built on TRL and PEFT."""
