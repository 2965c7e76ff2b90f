"""Test data shared by the test modules (which never import each other)."""

from __future__ import annotations

import importlib
import pathlib
import sys

import numpy as np
import pytest

import prefopt

KIND = prefopt.available_losses()
ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_example(name: str):
    """The module ``examples/<name>.py`` (the examples are scripts, not a package).

    The folder goes on ``sys.path``, so that spawned worker processes import it too.
    """
    folder = str(ROOT / "examples")
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0, 1],
        [0, 1, 0, 0, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
    ],
    dtype=bool,
)


def group_batch(rng, case="random"):
    B, n = MASK.shape
    logps = rng.normal(-80.0, 25.0, size=(B, n))
    ref = logps + rng.normal(0.0, 3.0, size=(B, n))
    rewards = rng.normal(0.0, 1.0, size=(B, n))
    lengths = rng.integers(1, 60, size=(B, n)).astype(np.float64)
    if case == "zero":
        ref = logps.copy()
    elif case == "extreme":
        ref = logps.copy()
        logps = logps + rng.choice([-1e4, 1e4], size=(B, n))
    return logps, ref, rewards, lengths


# Option sets each loss is tested with; "lengths" asks for the optional token counts.
VARIANTS = {
    "sigmoid": [{}, {"label_smoothing": 0.2}],
    "robust": [{"label_smoothing": 0.2}],
    "ipo": [{}, {"lengths": True}],
    "hinge": [{}],
    "exo_pair": [{}, {"label_smoothing": 0.1}],
    "nca_pair": [{}],
    "bco_pair": [{}, {"delta": 0.3}],
    "sppo_hard": [{}],
    "apo_zero": [{}],
    "apo_down": [{}],
    "discopop": [{}, {"tau": 0.5}],
    "aot": [{}, {"label_smoothing": 0.1}],
    "aot_unpaired": [{}],
    "sigmoid_norm": [{"lengths": True}],
    "simpo": [{}, {"label_smoothing": 0.1}],
    "cpo": [{}, {"cpo_alpha": 0.0}],
    "orpo": [{}],
    "kto": [{}, {"kl": 0.7, "desirable_weight": 1.3}],
    "mpo": [{}, {"weighting": "signed"}],
    "infonca": [{}, {"tau": 0.5}],
    "nca": [{}],
    "plackett_luce": [{}],
    "lipo": [{}],
}


def make_case(name, case, rng, variant):
    """(positional arrays, keyword arrays, options) of float64 NumPy data."""
    kind, opts = KIND[name], dict(variant)
    lengths = opts.pop("lengths", False)
    B = 6
    if kind == "group":
        n = MASK.shape[1]
        logps = rng.normal(-80.0, 25.0, size=(B, n))
        ref = logps + rng.normal(0.0, 3.0, size=(B, n))
        if case == "zero":
            ref = logps.copy()
        elif case == "extreme":  # distinct log-ratios: no near-ties for the rankings
            logps = logps + rng.choice([-1e4, 1e4], size=(B, n))
        rewards = rng.normal(0.0, 1.0, size=(B, n))
        rewards[0, 3] = rewards[0, 1]  # a tie: the rankings must break it by position
        return [logps, ref, rewards], {"mask": MASK}, opts
    if kind == "reference-free":
        cw, cl = -rng.uniform(5.0, 300.0, size=(2, B))
        if case == "zero":
            cl = cw.copy()
        elif case == "extreme":
            cw[:3], cl[3:] = -1e4, -1e-3
        kw = {"chosen_lengths": rng.integers(1, 60, B).astype(float)}
        if name != "cpo":
            kw["rejected_lengths"] = rng.integers(1, 60, B).astype(float)
        return [cw, cl], kw, opts
    if kind == "unpaired":
        logps = rng.normal(-120.0, 30.0, size=B)
        ref = logps + rng.normal(0.0, 3.0, size=B)
        if case == "zero":
            ref = logps.copy()
        elif case == "extreme":
            ref = logps + np.array([1e4, -1e4, 1e4, -1e4, 0.0, 5.0])
        return [logps, ref, np.arange(B) % 3 != 0], {}, opts
    base = rng.normal(-120.0, 30.0, size=(4, B))
    if case == "zero":
        base[0], base[1] = base[2], base[3]
    elif case == "extreme":
        base[0] = base[2] + np.array([1e4, -1e4, 1e4, -1e4, 0.0, 5.0])
        base[1] = base[3] + np.array([-1e4, 1e4, 1e4, -1e4, 1e4, -5.0])
    kw = {}
    if lengths:
        kw = {
            k: rng.integers(1, 60, B).astype(float) for k in ("chosen_lengths", "rejected_lengths")
        }
    return list(base), kw, opts


def to_backend(backend, positional, keywords, dtype):
    def convert(a):
        if a is None:
            return None
        if a.dtype == bool:
            return backend.asarray(a, "bool")
        return backend.asarray(a, dtype)

    pos = [convert(a) for a in positional]
    if len(pos) == 3 and positional[2].dtype != bool:  # group rewards: float32 or float64
        pos[2] = backend.asarray(positional[2], "float64" if dtype == "float64" else "float32")
    return pos, {k: convert(v) for k, v in keywords.items()}


def skip_unless_installed(*sources: str) -> None:
    """Skip the calling test when a module that ``sources`` (Python code) imports is missing."""
    import ast
    import doctest

    for source in sources:
        if source.lstrip().startswith(">>>"):  # a doctest session: its code, outputs dropped
            source = doctest.script_from_examples(source)
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                pytest.importorskip(name.split(".")[0])
