"""Independent float64 references: plain Python loops over lists with ``math``.

Nothing here imports prefopt. Each function takes nested lists (or NumPy arrays) and returns
a list of per-example losses, following the formulas of the loss pages in docs/losses/ literally.
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
        # docs/losses/mpo.md's form: logsumexp over all valid minus logsumexp over the chosen.
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


def _sig(z: float) -> float:
    return math.exp(log_sigmoid(z))


def _f(h, kind, alpha):
    if kind == "forward_kl":
        return 1.0 - math.exp(-h)
    if kind == "js_divergence":
        return math.log(2.0) + log_sigmoid(h)
    if kind == "alpha_divergence" and alpha != 1.0:
        return (math.exp((alpha - 1.0) * h) - 1.0) / (alpha - 1.0)
    return h


def _pair_loss(name, hw, hl, lw, ll, beta, o):
    z = beta * (hw - hl)
    ls = log_sigmoid
    if name in ("sigmoid", "dpo", "aot", "aot_unpaired"):
        e = o.get("label_smoothing", 0.0)
        return -(1 - e) * ls(z) - e * ls(-z)
    if name == "robust":
        e = o.get("label_smoothing", 0.0)
        return (-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e)
    if name == "ipo":
        d = hw / lw - hl / ll if lw is not None else hw - hl
        return (d - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(0.0, 1.0 - z)
    if name == "exo_pair":
        e = o.get("label_smoothing", 1e-3)
        return _sig(z) * (ls(z) - math.log(1 - e)) + _sig(-z) * (ls(-z) - math.log(e))
    if name == "nca_pair":
        return -ls(beta * hw) - 0.5 * ls(-beta * hw) - 0.5 * ls(-beta * hl)
    if name == "bco_pair":
        d = o.get("delta", 0.0)
        return -ls(beta * hw - d) - ls(-(beta * hl - d))
    if name == "sppo_hard":
        return (hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return (1 - _sig(beta * hw)) + _sig(beta * hl)
    if name == "apo_down":
        return _sig(beta * hw) + (1 - _sig(z))
    if name == "discopop":
        tau = o.get("tau", 0.05)
        m = _sig(z / tau)
        try:
            exp_part = m * math.exp(-z)
        except OverflowError:  # m is 0 to far beyond what exp(-z) overflows by
            exp_part = math.exp(log_sigmoid(z / tau) - z)
        return (1 - m) * -ls(z) + exp_part
    if name == "sigmoid_norm":
        return -ls(beta * (hw / lw - hl / ll))
    raise KeyError(name)


def pairwise(
    name,
    cw,
    cl,
    rcw=None,
    rcl=None,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
    beta=0.1,
    f_divergence="reverse_kl",
    f_alpha=0.5,
    **o,
):
    B = len(cw)
    lw = [None] * B if chosen_lengths is None else [float(x) for x in chosen_lengths]
    ll = [None] * B if rejected_lengths is None else [float(x) for x in rejected_lengths]
    if name == "aot":
        gap = sorted(float(cw[i]) - float(cl[i]) for i in range(B))
        ref = sorted((float(rcw[i]) - float(rcl[i])) if rcw is not None else 0.0 for i in range(B))
        return [_pair_loss(name, gap[i] - ref[i], 0.0, None, None, beta, o) for i in range(B)]
    hw = [
        _f(float(cw[i]) - (float(rcw[i]) if rcw is not None else 0.0), f_divergence, f_alpha)
        for i in range(B)
    ]
    hl = [
        _f(float(cl[i]) - (float(rcl[i]) if rcl is not None else 0.0), f_divergence, f_alpha)
        for i in range(B)
    ]
    if name == "aot_unpaired":
        hw, hl = sorted(hw), sorted(hl)
    return [_pair_loss(name, hw[i], hl[i], lw[i], ll[i], beta, o) for i in range(B)]


def simpo(cw, cl, *, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5, label_smoothing=0.0):
    out = []
    for i in range(len(cw)):
        z = beta * (cw[i] / chosen_lengths[i] - cl[i] / rejected_lengths[i]) - gamma
        e = label_smoothing
        out.append(-(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z))
    return out


def cpo(cw, cl, *, chosen_lengths=None, beta=0.1, cpo_alpha=1.0, label_smoothing=0.0):
    out = []
    for i in range(len(cw)):
        z = beta * (cw[i] - cl[i])
        e = label_smoothing
        nll = -cw[i] / chosen_lengths[i] if cpo_alpha else 0.0
        out.append(-(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z) + cpo_alpha * nll)
    return out


def orpo(cw, cl, *, chosen_lengths, rejected_lengths, beta=0.1):
    def log_odds(a):
        return a - math.log(1.0 - math.exp(a))

    out = []
    for i in range(len(cw)):
        aw, al = cw[i] / chosen_lengths[i], cl[i] / rejected_lengths[i]
        out.append(-aw - beta * log_sigmoid(log_odds(aw) - log_odds(al)))
    return out


def kto(
    logps, ref_logps, desirable, *, kl=0.0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0
):
    out = []
    for i in range(len(logps)):
        h = float(logps[i]) - (float(ref_logps[i]) if ref_logps is not None else 0.0)
        if desirable[i]:
            out.append(desirable_weight * (1 - _sig(beta * (h - kl))))
        else:
            out.append(undesirable_weight * (1 - _sig(beta * (kl - h))))
    return out


def _group_rows(logps, ref_logps, rewards, mask, lengths, beta):
    """Per group: the valid slots, their scores s_i and rewards r_i (dicts by slot)."""
    for b in range(len(logps)):
        n = len(logps[b])
        valid = [i for i in range(n) if mask is None or bool(mask[b][i])]
        s, r = {}, {}
        for i in valid:
            h = float(logps[b][i]) - (float(ref_logps[b][i]) if ref_logps is not None else 0.0)
            if lengths is not None:
                h /= float(lengths[b][i])
            s[i], r[i] = beta * h, float(rewards[b][i])
        yield valid, s, r


def _softmax(values: dict, tau: float) -> dict:
    top = _lse([v / tau for v in values.values()])
    return {i: math.exp(v / tau - top) for i, v in values.items()}


def infonca(logps, ref_logps, rewards, *, mask=None, lengths=None, beta=0.1, tau=1.0):
    out = []
    for valid, s, r in _group_rows(logps, ref_logps, rewards, mask, lengths, beta):
        if not valid:
            out.append(0.0)
            continue
        p, norm = _softmax(r, tau), _lse(list(s.values()))
        out.append(-sum(p[i] * (s[i] - norm) for i in valid))
    return out


def nca(logps, ref_logps, rewards, *, mask=None, lengths=None, beta=0.1, tau=1.0):
    out = []
    for valid, s, r in _group_rows(logps, ref_logps, rewards, mask, lengths, beta):
        if not valid:
            out.append(0.0)
            continue
        p = _softmax(r, tau)
        out.append(
            -sum(p[i] * log_sigmoid(s[i]) for i in valid)
            - sum(log_sigmoid(-s[i]) for i in valid) / len(valid)
        )
    return out


def plackett_luce(logps, ref_logps, rewards, *, mask=None, lengths=None, beta=0.1):
    out = []
    for valid, s, r in _group_rows(logps, ref_logps, rewards, mask, lengths, beta):
        order = sorted(valid, key=lambda i: -r[i])  # Python's sort is stable
        out.append(
            -sum(s[order[k]] - _lse([s[j] for j in order[k:]]) for k in range(len(order) - 1))
        )
    return out


def lipo(logps, ref_logps, rewards, *, mask=None, lengths=None, beta=0.1):
    out = []
    for valid, s, r in _group_rows(logps, ref_logps, rewards, mask, lengths, beta):
        ideal = sorted(valid, key=lambda i: -r[i])
        max_dcg = sum((2 ** r[i] - 1) / math.log2(1 + k) for k, i in enumerate(ideal, 1))
        gain = {i: (2 ** r[i] - 1) / (max_dcg if max_dcg != 0 else 1.0) for i in valid}
        rank = {i: k for k, i in enumerate(sorted(valid, key=lambda i: -s[i]), 1)}
        total = 0.0
        for i in valid:
            for j in valid:
                if r[i] > r[j]:
                    delta = abs(gain[i] - gain[j]) * abs(
                        1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j])
                    )
                    total += delta * log_sigmoid(s[i] - s[j])
        out.append(-total)
    return out
