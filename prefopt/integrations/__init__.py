"""Thin glue to training frameworks.

``prefopt.integrations.transformers`` (PyTorch, Hugging Face ``Trainer``) and
``prefopt.integrations.jax`` (a loss-and-metrics function and an optax train step). Each
imports its framework; ``import prefopt`` imports neither.
"""
