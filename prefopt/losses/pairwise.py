"""Pairwise preference losses: one chosen and one rejected response per prompt, shape (B,)."""

from __future__ import annotations

import math
from types import ModuleType

from prefopt._ops import Array, log_sigmoid, sigmoid, softplus
from prefopt.losses.inputs import (
    F_DIVERGENCES,
    checked_options,
    narrower,
    pair_arrays,
    pair_inputs,
    reads_terms,
)

__all__ = ["F_DIVERGENCES"]  # re-exported for the docs of f_divergence


def smoothed_sigmoid_loss(minus_z: Array, label_smoothing: float, xp: ModuleType) -> Array:
    r"""$-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)$, the cDPO loss of a margin.

    Takes $-z$: a caller writes $\beta(h_l - h_w)$, which is $-\beta(h_w - h_l)$ to the last
    bit (a difference and a product only change sign when their operands do), so the plain
    loss is one kernel with no negation before it.
    """
    loss = softplus(minus_z, xp=xp)  # -log(sigmoid(z)): +0.0, never -0.0, when it saturates
    if not isinstance(label_smoothing, (int, float)) or label_smoothing:  # an array: always
        loss = (1.0 - label_smoothing) * loss + label_smoothing * softplus(-minus_z, xp=xp)
    return loss


def dpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
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
        f_divergence: Transform of the log-ratios before the loss: ``"reverse_kl"``
            (default, none), ``"forward_kl"``, ``"js_divergence"`` or ``"alpha_divergence"``
            (see the pairwise losses page). The same option exists on every loss of the DPO
            family.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
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

    Examples:
        >>> import numpy as np, prefopt
        >>> prefopt.dpo_loss(np.array([-5.0]), np.array([-9.0]), np.array([-6.0]),
        ...                  np.array([-8.0]), beta=0.5)
        array([0.31326169])
    """
    p = pair_inputs(dpo_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, label_smoothing=label_smoothing,
        f_divergence=f_divergence, f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    return smoothed_sigmoid_loss(p.margin(negated=True), p.options["label_smoothing"], p.xp)


@narrower(label_smoothing=(0.0, 0.5, {"open_high": True}))  # it divides by 1 - 2 eps
def robust_dpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Robust DPO (rDPO), per pair (TRL ``loss_type="robust"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \frac{-(1-\varepsilon)\log\sigma(z) + \varepsilon\log\sigma(-z)}{1 - 2\varepsilon}
    $$

    Unlike cDPO's label smoothing ([`dpo_loss`][prefopt.dpo_loss]) this is an unbiased
    estimate of the clean-label loss; it can be negative.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        label_smoothing: $\varepsilon \in [0, 0.5)$, the assumed share of flipped labels.
            Default 0 (plain DPO).
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy
        Feedback", ICML 2024, arXiv:2403.00409.
    """
    p = pair_inputs(robust_dpo_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, label_smoothing=label_smoothing,
        f_divergence=f_divergence, f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    eps = p.options["label_smoothing"]
    z = p.margin()
    loss = (1.0 - eps) * (0.0 - log_sigmoid(z, xp=p.xp)) + eps * log_sigmoid(-z, xp=p.xp)
    return loss / (1.0 - 2.0 * eps)


def ipo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Identity Preference Optimization, per pair (TRL ``loss_type="ipo"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \Big(\Delta' - \frac{1}{2\beta}\Big)^2, \qquad
    \Delta' = \frac{h_w}{|y_w|} - \frac{h_l}{|y_l|}\ \text{with lengths, else}\ h_w - h_l
    $$

    With ``chosen_lengths``/``rejected_lengths`` the log-ratios are averaged per token, as
    TRL does (a convention confirmed with the IPO authors); without them they are summed,
    as in the paper. The two differ by orders of magnitude in scale: pick $\beta$ for the
    one you use.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        chosen_lengths: (B,) token counts of the chosen responses (> 0); optional.
        rejected_lengths: (B,) token counts of the rejected responses; optional.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
        Preferences", AISTATS 2024, arXiv:2310.12036.
    """
    p = pair_inputs(ipo_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha,
        xp=xp,
    ), squared=True)  # fmt: skip
    delta = p.hw - p.hl if p.lw is None else p.hw / p.lw - p.hl / p.ll
    return (delta - 0.5 / p.beta) ** 2


def hinge_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""SLiC hinge loss, per pair (TRL ``loss_type="hinge"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \max(0,\ 1 - z)
    $$

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
        arXiv:2305.10425.
    """
    p = pair_inputs(hinge_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    z = p.margin()
    return p.xp.where(z < 1.0, 1.0 - z, 0.0)  # gradient 0 at z = 1 on every backend


@narrower(label_smoothing=(0.0, 0.5, {"open_low": True}))  # it takes log(eps)
def exo_pair_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""EXO, efficient exact optimization, per pair (TRL ``loss_type="exo_pair"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \sigma(z)\big(\log\sigma(z) - \log(1-\varepsilon)\big)
         + \sigma(-z)\big(\log\sigma(-z) - \log\varepsilon\big)
    $$

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        label_smoothing: $\varepsilon \in (0, 0.5]$, the target probability of the
            rejected response. Default 1e-3.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment",
        ICML 2024, arXiv:2402.00856.
    """
    p = pair_inputs(exo_pair_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, label_smoothing=label_smoothing,
        f_divergence=f_divergence, f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    eps = p.options["label_smoothing"]
    z = p.margin()
    pos, neg = log_sigmoid(z, xp=p.xp), log_sigmoid(-z, xp=p.xp)
    # the KL divergence from (1 - eps, eps) to (sigma(z), sigma(-z)): >= 0
    if isinstance(eps, (int, float)):
        return p.xp.exp(pos) * (pos - math.log1p(-eps)) + p.xp.exp(neg) * (neg - math.log(eps))
    return p.xp.exp(pos) * (pos - p.xp.log1p(-eps)) + p.xp.exp(neg) * (neg - p.xp.log(eps))


@reads_terms
def nca_pair_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Noise Contrastive Alignment on pairs, per pair (TRL ``loss_type="nca_pair"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = -\log\sigma(\beta h_w) - \tfrac12\log\sigma(-\beta h_w) - \tfrac12\log\sigma(-\beta h_l)
    $$

    Unlike DPO it acts on each log-ratio alone, not only on their difference, so it keeps
    the likelihood of the chosen response from falling. The group version is
    [`nca_loss`][prefopt.nca_loss].

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Chen et al., "Noise Contrastive Alignment of Language Models with Explicit
        Rewards", NeurIPS 2024, arXiv:2402.05369.
    """
    p = pair_inputs(nca_pair_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    sw, sl = p.beta * p.hw, p.beta * p.hl
    return (
        0.0
        - log_sigmoid(sw, xp=p.xp)
        - 0.5 * (log_sigmoid(-sw, xp=p.xp) + log_sigmoid(-sl, xp=p.xp))
    )


@reads_terms
def bco_pair_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    delta: float | Array = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Binary Classifier Optimization on pairs, per pair (TRL ``loss_type="bco_pair"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = -\log\sigma(\beta h_w - \delta) - \log\sigma\big(-(\beta h_l - \delta)\big)
    $$

    Each response is classified on its own (chosen: positive, rejected: negative) around
    the shift $\delta$. With the default $\delta = 0$ this differs from TRL, whose trainer
    subtracts a running mean of the implicit rewards: pass that mean to match it.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        delta: $\delta$, the reward shift: a number or a 0-d array, e.g. a running mean
            of the implicit rewards $\beta h$ that the caller keeps (and detaches). TRL keeps
            one inside its trainer; prefopt's losses are pure, so it is an input. Default 0.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
        arXiv:2404.04656.
    """
    p = pair_inputs(bco_pair_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, delta=delta, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    delta = p.options["delta"]
    return (
        0.0
        - log_sigmoid(p.beta * p.hw - delta, xp=p.xp)
        - log_sigmoid(delta - p.beta * p.hl, xp=p.xp)
    )


@reads_terms
def sppo_hard_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""SPPO with hard labels, per pair (TRL ``loss_type="sppo_hard"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \Big(h_w - \frac{1}{2\beta}\Big)^2 + \Big(h_l + \frac{1}{2\beta}\Big)^2
    $$

    The winner's log-ratio is pulled to $+1/(2\beta)$ and the loser's to $-1/(2\beta)$,
    the hard-label approximation of the paper's win probabilities (1 and 0).

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Wu et al., "Self-Play Preference Optimization for Language Model Alignment",
        arXiv:2405.00675.
    """
    p = pair_inputs(sppo_hard_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ), squared=True)  # fmt: skip
    target = 0.5 / p.beta
    return (p.hw - target) ** 2 + (p.hl + target) ** 2


def apo_zero_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Anchored Preference Optimization, "zero" variant, per pair (TRL ``loss_type="apo_zero"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \big(1 - \sigma(\beta h_w)\big) + \sigma(\beta h_l)
    $$

    Raises the chosen likelihood and lowers the rejected one: for chosen responses better
    than the model's own outputs.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive
        Revisions: Addressing Underspecification in Alignment", arXiv:2408.06266.
    """
    p = pair_inputs(apo_zero_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    # 1 - sigma(x) = sigma(-x), without the cancellation
    return sigmoid(-p.beta * p.hw, xp=p.xp) + sigmoid(p.beta * p.hl, xp=p.xp)


def apo_down_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Anchored Preference Optimization, "down" variant, per pair (TRL ``loss_type="apo_down"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = \sigma(\beta h_w) + \big(1 - \sigma(z)\big)
    $$

    Lowers both likelihoods, the rejected one more: for chosen responses worse than the
    model's own outputs.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive
        Revisions: Addressing Underspecification in Alignment", arXiv:2408.06266.
    """
    p = pair_inputs(apo_down_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    return sigmoid(p.beta * p.hw, xp=p.xp) + sigmoid(p.margin(negated=True), xp=p.xp)


@narrower(tau=(0.0, 1.0, {"open_low": True}))  # a bounded exponent: tau <= 1
def discopop_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""DiscoPOP, the log-ratio modulated loss, per pair (TRL ``loss_type="discopop"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = (1 - m)\,\big(-\log\sigma(z)\big) + m\,e^{-z}, \qquad m = \sigma(z/\tau)
    $$

    A blend of the logistic (DPO) and exponential losses found by an LLM-driven search.
    $\tau$ is limited to $(0, 1]$: above 1 the loss itself grows like $e^{-z}$ for very
    negative margins and overflows.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        tau: $\tau \in (0, 1]$, the temperature of the modulation. Default 0.05.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Lu et al., "Discovering Preference Optimization Algorithms with and for Large
        Language Models", NeurIPS 2024, arXiv:2406.08414.
    """
    p = pair_inputs(discopop_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, tau=tau, f_divergence=f_divergence,
        f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    tau = p.options["tau"]
    z = p.margin()
    # m * e^-z as one exponent: bounded above for tau <= 1, where e^-z alone overflows
    exp_part = p.xp.exp(log_sigmoid(z / tau, xp=p.xp) - z)
    return sigmoid(-z / tau, xp=p.xp) * (0.0 - log_sigmoid(z, xp=p.xp)) + exp_part


def aot_unpaired_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Alignment via Optimal Transport, unpaired, per pair (TRL ``loss_type="aot_unpaired"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell_i = -(1-\varepsilon)\log\sigma(z_i) - \varepsilon\log\sigma(-z_i), \qquad
    z = \beta\big(\operatorname{sort}(h_w) - \operatorname{sort}(h_l)\big)
    $$

    The chosen and rejected log-ratios are sorted separately across the batch and matched
    by rank (the one-dimensional optimal transport plan), so the pairs need not be pairs:
    the loss asks the *distribution* of chosen log-ratios to dominate the rejected one.
    Entry $i$ of the output belongs to the $i$-th smallest of each, not to input pair $i$.
    It couples the whole batch: never compute it in chunks or per device.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        label_smoothing: $\varepsilon \in [0, 0.5]$. Default 0.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
        Transport", NeurIPS 2024, arXiv:2406.05882.
    """
    p = pair_inputs(aot_unpaired_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, label_smoothing=label_smoothing,
        f_divergence=f_divergence, f_alpha=f_alpha, xp=xp,
    ))  # fmt: skip
    return smoothed_sigmoid_loss(
        p.beta * (p.xp.sort(p.hl) - p.xp.sort(p.hw)), p.options["label_smoothing"], p.xp
    )


@reads_terms
def sigmoid_norm_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    chosen_lengths: Array,
    rejected_lengths: Array,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    xp: ModuleType | None = None,
) -> Array:
    r"""Length-normalised DPO, per pair (TRL ``loss_type="sigmoid_norm"``).

    With log-ratios $h_w = \log\pi(y_w) - \log\pi_{ref}(y_w)$, $h_l$ likewise, and
    $z = \beta (h_w - h_l)$:

    $$
    \ell = -\log\sigma\Big(\beta\Big(\frac{h_w}{|y_w|} - \frac{h_l}{|y_l|}\Big)\Big)
    $$

    DPO on per-token log-ratios: removes DPO's pull towards longer chosen responses.
    The lengths are required.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): reference-free, $h = \log\pi$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        chosen_lengths: (B,) token counts of the chosen responses (> 0).
        rejected_lengths: (B,) token counts of the rejected responses.
        beta: $\beta > 0$. Default 0.1.
        f_divergence: Transform of the log-ratios: ``"reverse_kl"`` (default, none),
            ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``.
        f_alpha: $\alpha > 0$ of ``"alpha_divergence"``. Default 0.5.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Lambert et al., "Tülu 3: Pushing Frontiers in Open Language Model Post-Training",
        arXiv:2411.15124 (length-normalised DPO); DPO: arXiv:2305.18290.
    """
    p = pair_inputs(sigmoid_norm_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha,
        xp=xp,
    ))  # fmt: skip
    return 0.0 - log_sigmoid(p.beta * (p.hw / p.lw - p.hl / p.ll), xp=p.xp)


def aot_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    xp: ModuleType | None = None,
) -> Array:
    r"""Alignment via Optimal Transport, paired, per pair (TRL ``loss_type="aot"``).

    With the policy's log-probability gaps $g = \log\pi(y_w) - \log\pi(y_l)$ and the
    reference's $g^{ref}$, each sorted across the batch:

    $$
    \ell_i = -(1-\varepsilon)\log\sigma(z_i) - \varepsilon\log\sigma(-z_i), \qquad
    z = \beta\big(\operatorname{sort}(g) - \operatorname{sort}(g^{ref})\big)
    $$

    The policy's distribution of gaps is asked to dominate the reference's (first-order
    stochastic dominance, matched by rank). Entry $i$ of the output belongs to the $i$-th
    smallest gaps, not to input pair $i$. It couples the whole batch: never compute it in
    chunks or per device. The f-divergence transforms do not apply.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) the chosen responses under the reference model, or ``None``
            (with ``ref_rejected_logps``): then $g^{ref} = 0$.
        ref_rejected_logps: (B,) the rejected responses under the reference, or ``None``.
        beta: $\beta > 0$. Default 0.1.
        label_smoothing: $\varepsilon \in [0, 0.5]$. Default 0.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per rank in the inputs' floating dtype (float32 for half precision).

    References:
        Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
        Transport", NeurIPS 2024, arXiv:2406.05882.
    """
    fn, args = "aot_loss", dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=beta, label_smoothing=label_smoothing, xp=xp,
    )  # fmt: skip
    xp, cw, cl, rw, rl = pair_arrays(
        fn, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, xp
    )
    o = checked_options(aot_loss, args, cw.dtype, xp)
    gap = xp.sort(cw - cl) if rw is None else xp.sort(cw - cl) - xp.sort(rw - rl)
    return smoothed_sigmoid_loss(-(o["beta"] * gap), o["label_smoothing"], xp)
