"""Unpaired losses: single responses marked desirable or undesirable, shape (B,)."""

from __future__ import annotations

from types import ModuleType

from prefopt import _checks
from prefopt._ops import Array, get_namespace, masked_mean, sigmoid, stop_gradient
from prefopt.losses.inputs import log_ratios, unpaired_inputs


def kto_kl(
    logps: Array,
    ref_logps: Array,
    *,
    mask: Array | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""KTO's reference point: the batch estimate of $\mathrm{KL}(\pi\,\|\,\pi_{ref})$.

    $$
    z_0 = \max\Big(0,\ \frac{1}{|M|}\sum_{i \in M} \big(\log\pi(y_i) - \log\pi_{ref}(y_i)\big)\Big)
    $$

    computed on *mismatched* pairs: the completion $y_i$ of one example scored under the
    prompt of another (TRL shifts the completions of a batch by one), so that the estimate
    does not reward the batch's own completions. The result carries no gradient
    (detached in PyTorch, ``stop_gradient`` in JAX), as the paper prescribes. Under data
    parallelism, average it over processes before passing it to
    [`kto_loss`][prefopt.kto_loss] so that every process uses the same reference point.

    Args:
        logps: (B,) summed log-probabilities of the mismatched completions under the policy.
        ref_logps: (B,) the same under the reference model.
        mask: (B,) boolean, the entries that count. Default ``None``: all.
        xp: The array namespace, if known.

    Returns:
        A 0-d array $z_0 \ge 0$ in the compute dtype; 0 when ``mask`` selects nothing.

    References:
        Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
        ICML 2024, arXiv:2402.01306.
    """
    fn = "kto_kl"
    xp = get_namespace(logps, ref_logps, mask, xp=xp)
    _checks.same_shape(fn, "B", {"logps": logps, "ref_logps": ref_logps, "mask": mask})
    if mask is not None:
        _checks.boolean(fn, "mask", mask, xp)
    h = log_ratios(fn, logps, ref_logps, xp)
    if mask is not None:
        h = xp.where(mask, h, 0.0)  # padding may hold NaN
    kl = masked_mean(h, mask, xp=xp)
    return stop_gradient(xp.clip(kl, min=0.0), xp=xp)


def kto_loss(
    logps: Array,
    ref_logps: Array | None,
    desirable: Array,
    *,
    kl: float | Array = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    xp: ModuleType | None = None,
) -> Array:
    r"""Kahneman-Tversky Optimization, per response (TRL ``KTOTrainer``).

    With the log-ratio $h = \log\pi(y) - \log\pi_{ref}(y)$ and the reference point $z_0$
    (``kl``, from [`kto_kl`][prefopt.kto_kl]):

    $$
    \ell(y) = \begin{cases}
        \lambda_D\,\big(1 - \sigma(\beta(h - z_0))\big) & y \text{ desirable} \\
        \lambda_U\,\big(1 - \sigma(\beta(z_0 - h))\big) & y \text{ undesirable}
    \end{cases}
    $$

    Needs no pairs: each response is only marked good or bad. ``kl`` gets no gradient.
    The paper suggests $\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]$ for $n_D$ desirable
    and $n_U$ undesirable examples.

    Args:
        logps: (B,) summed log-probabilities of each response under the policy.
        ref_logps: (B,) the same under the reference model, or ``None`` (then $h = \log\pi$).
        desirable: (B,) boolean, ``True`` for desirable responses.
        kl: $z_0 \ge 0$, a number or a 0-d array ([`kto_kl`][prefopt.kto_kl]). Default 0
            (KTO without the KL term).
        beta: $\beta > 0$. Default 0.1.
        desirable_weight: $\lambda_D \ge 0$. Default 1.0.
        undesirable_weight: $\lambda_U \ge 0$. Default 1.0.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per response in the inputs' floating dtype (float32 for half precision).

    References:
        Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
        ICML 2024, arXiv:2402.01306.
    """
    fn = "kto_loss"
    u = unpaired_inputs(kto_loss, dict(
        logps=logps, ref_logps=ref_logps, desirable=desirable, kl=kl, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, xp=xp,
    ))  # fmt: skip
    _checks.same_shape(fn, "B", {"logps": logps, "desirable": desirable})
    _checks.boolean(fn, "desirable", desirable, u.xp)
    xp, h = u.xp, u.ratios
    if isinstance(kl, (int, float)):
        kl = _checks.non_negative(fn, "kl", kl)
    elif getattr(kl, "ndim", None) != 0:
        raise ValueError(
            f"{fn}: kl must be a number or a 0-d array; got {type(kl).__name__} "
            f"of shape {tuple(getattr(kl, 'shape', ()))}"
        )
    else:
        kl = stop_gradient(_checks.cast(kl, h.dtype, xp), xp=xp)
        if _checks.values_checked(kl, xp, None) and not bool(kl >= 0.0):
            raise ValueError(f"{fn}: kl must be >= 0 (kto_kl clamps it at 0); got {float(kl)}")
    z = u.beta * (h - kl)
    # 1 - sigma(x) = sigma(-x), without the cancellation
    good, bad = u.options["desirable_weight"], u.options["undesirable_weight"]
    return xp.where(desirable, good * sigmoid(-z, xp=xp), bad * sigmoid(z, xp=xp))
