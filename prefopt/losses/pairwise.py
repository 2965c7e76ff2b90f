"""Pairwise preference losses: one chosen and one rejected response per prompt, shape (B,)."""

from __future__ import annotations

from types import ModuleType

from prefopt import _checks
from prefopt._ops import Array, get_namespace, log_sigmoid


def log_ratios(
    fn: str,
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None,
    ref_rejected_logps: Array | None,
    xp: ModuleType,
) -> tuple[Array, Array]:
    """Validate a pairwise batch and return ``(h(chosen), h(rejected))`` in the compute dtype."""
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            f"{fn}: pass both ref_chosen_logps and ref_rejected_logps, or neither "
            "(reference-free); got only one"
        )
    arrays = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _checks.same_shape(fn, "B", arrays)
    for name, x in arrays.items():
        if x is not None:
            _checks.floating(fn, name, x, xp)
    dtype = _checks.compute_dtype(xp, *arrays.values())
    hw, hl, rw, rl = (_checks.cast(x, dtype, xp) for x in arrays.values())
    if rw is not None:
        hw, hl = hw - rw, hl - rl
    return hw, hl


def smoothed_sigmoid_loss(z: Array, label_smoothing: float, xp: ModuleType) -> Array:
    r"""$-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)$, the cDPO loss of a margin."""
    loss = 0.0 - log_sigmoid(z, xp=xp)  # +0.0, never -0.0, for a saturated margin
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * log_sigmoid(-z, xp=xp)
    return loss


def dpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    xp: ModuleType | None = None,
) -> Array:
    r"""Direct Preference Optimization loss, per pair (TRL ``loss_type="sigmoid"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$ and
    $h_l = \log\pi(y_l) - \log\pi_{ref}(y_l)$ and the margin $z = \beta (h_w - h_l)$:

    $$
    \ell = -(1-\varepsilon)\,\log\sigma(z) \;-\; \varepsilon\,\log\sigma(-z)
    $$

    $\varepsilon$ (``label_smoothing``) is the conservative DPO (cDPO) assumption that a
    share $\varepsilon$ of the labels is flipped; $\varepsilon = 0$ is plain DPO. Without
    reference log-probabilities (both ``None``) the log-ratios are the policy log-probs
    themselves (reference-free DPO).

    The loss of bf16/fp16 inputs is computed, and returned, in float32.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the frozen reference model, or
            ``None`` (with ``ref_rejected_logps``) for reference-free DPO.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$, the strength of the implicit KL regularisation. Default 0.1.
        label_smoothing: $\varepsilon \in [0, 0.5]$. Default 0.
        xp: The array namespace, if known (skips the lookup, about 1 µs).

    Returns:
        (B,) loss per pair, in the inputs' floating dtype (float32 for half precision).
        Reduce it yourself (``mean`` is what TRL does).

    Raises:
        ValueError: On a rank other than 1, mismatched shapes, only one reference array, or
            a hyperparameter out of range.
        TypeError: On non-floating log-probabilities.

    References:
        Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
        Reward Model", NeurIPS 2023, arXiv:2305.18290. cDPO: Mitchell, "A note on DPO with
        noisy preferences and relationship to IPO", 2023.

    Example:
        >>> import numpy as np, prefopt
        >>> prefopt.dpo_loss(np.array([-5.0]), np.array([-9.0]), np.array([-6.0]),
        ...                  np.array([-8.0]), beta=0.5)
        array([0.31326169])
    """
    fn = "dpo_loss"
    xp = get_namespace(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, xp=xp)
    beta = _checks.positive(fn, "beta", beta)
    label_smoothing = _checks.in_range(fn, "label_smoothing", label_smoothing, 0.0, 0.5)
    hw, hl = log_ratios(fn, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, xp)
    return smoothed_sigmoid_loss(beta * (hw - hl), label_smoothing, xp)
