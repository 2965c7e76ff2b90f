"""Hugging Face ``transformers`` integration: a TRL-compatible ``Trainer``.

[`PreferenceTrainer`][prefopt.integrations.transformers.PreferenceTrainer] is built like
TRL's ``DPOTrainer`` (a model or a path, ``ref_model``, ``args``, the datasets, a
``processing_class``, a ``peft_config``) and takes TRL's data formats: pair rows
``{"prompt", "chosen", "rejected"}`` (explicit or implicit prompt, standard or
conversational), plus prefopt's **group** rows ``{"prompt", "responses": [...],
"rewards": [...]}`` with any number of responses per prompt. ``args`` is a
[`PreferenceConfig`][prefopt.integrations.transformers.PreferenceConfig] or a TRL
``DPOConfig``, read by [`trainer_settings`][prefopt.integrations.transformers.trainer_settings].
Prompt tokens and padding never count in a log-prob.

This module gathers the public names; each lives in a file named for what it holds:
``collator.py`` (rows to a batch and its group layout), ``forward.py`` (log-probs, the
reference and the training step), ``attention.py`` (the shared group attention),
``config.py`` (the settings, TRL's ``DPOConfig`` read by name) and ``trainer.py``.
"""

from __future__ import annotations

from prefopt.integrations.collator import PreferenceCollator
from prefopt.integrations.config import PreferenceConfig, TrainerSettings, trainer_settings
from prefopt.integrations.forward import (
    batch_logps,
    loss_and_metrics,
    precompute_ref_logps,
    reference_logps,
)
from prefopt.integrations.trainer import PreferenceTrainer, disable_dropout

__all__ = [
    "PreferenceCollator",
    "PreferenceConfig",
    "PreferenceTrainer",
    "TrainerSettings",
    "batch_logps",
    "disable_dropout",
    "loss_and_metrics",
    "precompute_ref_logps",
    "reference_logps",
    "trainer_settings",
]
