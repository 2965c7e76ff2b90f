"""The parity suite's backends.

Every test that takes the ``backend`` fixture runs once per installed array library:
numpy, array_api_strict, torch, jax, and torch-cuda / jax-gpu when a GPU is present.
``PREFOPT_BACKENDS=numpy,torch`` narrows the set; a backend named there that is not
installed is an error, not a skip, so CI cannot go green by losing a backend.
"""

from __future__ import annotations

import importlib
import os

# Before jax is imported anywhere: 4 simulated CPU devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import numpy as np
import pytest

from tests.backends import ALL_BACKENDS, make_backend

try:
    import jax

    jax.config.update("jax_enable_x64", True)  # else float64 is silently float32
except ImportError:  # pragma: no cover
    jax = None


def _selected():
    wanted = os.environ.get("PREFOPT_BACKENDS")
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        unknown = sorted(set(names) - set(ALL_BACKENDS))
        if unknown:
            raise pytest.UsageError(f"PREFOPT_BACKENDS: unknown {unknown}; known {ALL_BACKENDS}")
        return names
    names = []
    for name in ALL_BACKENDS:
        try:
            make_backend(name)
        except (ImportError, RuntimeError):
            continue
        names.append(name)
    return names


SELECTED = _selected()


DIFFERENTIABLE = [n for n in SELECTED if make_backend(n).differentiable]


@pytest.fixture(params=SELECTED, scope="session")
def backend(request):
    """Every selected array library."""
    return make_backend(request.param)


@pytest.fixture(params=DIFFERENTIABLE, scope="session")
def diff_backend(request):
    """The selected libraries with autodiff (torch, jax)."""
    return make_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20241206)


def pytest_report_header(config):
    return f"prefopt backends: {', '.join(SELECTED)}"


def has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@pytest.fixture(params=["own keys", "shared keys"])
def keys(request, monkeypatch):
    """Both exact forms of the shared group attention (prefopt.layout.response_attention).

    For the PyTorch and the JAX group forward alike.
    """
    import math

    import prefopt.layout

    waste = 0.0 if request.param == "own keys" else math.inf
    monkeypatch.setattr(prefopt.layout, "SHARED_KEYS_MAX_WASTE", waste)
    return request.param
