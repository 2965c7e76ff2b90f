"""Collection for ``pytest --doctest-modules prefopt backends tests``.

A module whose framework is not installed is left out, so that a core-only install
(numpy, array-api-compat, array-api-strict, pytest) runs the suite with skips, not errors.
The scripts in ``tests/scripts`` are run by tests in subprocesses, never collected.
"""

import importlib.util

_NEEDS = {
    "backends/torch": "torch",
    "backends/jax": "jax",
    "prefopt/cli": "transformers",
    "prefopt/integrations/transformers.py": "transformers",
    "prefopt/integrations/attention.py": "transformers",
    "prefopt/integrations/collator.py": "torch",
    "prefopt/integrations/config.py": "transformers",
    "prefopt/integrations/forward.py": "transformers",
    "prefopt/integrations/trainer.py": "transformers",
    "prefopt/integrations/trl.py": "trl",
    "prefopt/integrations/jax.py": "optax",
    "prefopt/integrations/flax_llama.py": "flax",
    "prefopt/integrations/tunix.py": "tunix",
}

collect_ignore = ["tests/scripts"] + [
    path for path, module in _NEEDS.items() if importlib.util.find_spec(module) is None
]
