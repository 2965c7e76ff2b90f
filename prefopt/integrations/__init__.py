"""Thin glue to training frameworks.

``prefopt.integrations.transformers`` (PyTorch, Hugging Face ``Trainer``) and
``prefopt.integrations.jax`` (a loss-and-metrics function and an optax train step). Each
imports its framework; ``import prefopt`` imports neither.
"""

import warnings

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Warn with ``message`` the first time only, whatever the warning filters say.

    What the integrations warn about (a prompt that tokenises apart, a model that cannot
    share its prompt) holds for every batch of a run.
    """
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
