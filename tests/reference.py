"""Independent float64 references: plain Python loops over lists with ``math``.

Nothing here imports prefopt. Each function takes nested lists (or NumPy arrays) and returns
a list of per-example losses, following the formulas of LOSSES.md literally.
"""

from __future__ import annotations

import math


def log_sigmoid(z: float) -> float:
    if z >= 0:
        return -math.log1p(math.exp(-z))
    return z - math.log1p(math.exp(z))


def _lse(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def dpo(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta=0.1, label_smoothing=0.0):
    out = []
    for i in range(len(chosen)):
        hw = float(chosen[i]) - (float(ref_chosen[i]) if ref_chosen is not None else 0.0)
        hl = float(rejected[i]) - (float(ref_rejected[i]) if ref_rejected is not None else 0.0)
        z = beta * (hw - hl)
        eps = label_smoothing
        out.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    return out


def mpo(
    logps,
    ref_logps,
    rewards,
    *,
    mask=None,
    chosen=None,
    lengths=None,
    beta=0.1,
    alpha=1.0,
    weighting="abs",
):
    out = []
    for b in range(len(logps)):
        n = len(logps[b])
        valid = [i for i in range(n) if mask is None or bool(mask[b][i])]
        mean = sum(float(rewards[b][i]) for i in valid) / max(len(valid), 1)
        dev = {i: float(rewards[b][i]) - mean for i in valid}
        if chosen is None:
            pos = [i for i in valid if dev[i] > 0]
        else:
            pos = [i for i in valid if bool(chosen[b][i])]
        neg = [i for i in valid if i not in pos]
        if not pos or not neg:
            out.append(0.0)
            continue
        t = {}
        for i in valid:
            h = float(logps[b][i]) - (float(ref_logps[b][i]) if ref_logps is not None else 0.0)
            if lengths is not None:
                h /= float(lengths[b][i])
            log_w = {
                "abs": alpha * abs(dev[i]),
                "signed": alpha * dev[i],
                "squared": alpha * dev[i] ** 2,
                "none": 0.0,
            }[weighting]
            t[i] = beta * h + log_w
        # LOSSES.md's form: logsumexp over all valid minus logsumexp over the chosen.
        out.append(_lse([t[i] for i in valid]) - _lse([t[i] for i in pos]))
    return out


def numeric_grad(f, args, wrt, h=1e-4):
    """Central finite differences of ``sum(f(*args))`` with respect to ``args[k]``, k in wrt.

    ``args`` are NumPy float64 arrays; returns one array of partial derivatives per k.
    """
    import numpy as np

    grads = []
    for k in wrt:
        base = np.array(args[k], dtype=np.float64)
        g = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += h
            minus[idx] -= h
            fp = sum(f(*[plus if j == k else a for j, a in enumerate(args)]))
            fm = sum(f(*[minus if j == k else a for j, a in enumerate(args)]))
            # the step actually taken: x + h is rounded when |x| is large
            g[idx] = (fp - fm) / (plus[idx] - minus[idx])
        grads.append(g)
    return grads
