"""Reference-free pairwise losses: no reference model, token counts instead, shape (B,)."""

from __future__ import annotations

import math
from types import ModuleType

from prefopt._ops import Array, log_sigmoid
from prefopt.losses.inputs import pair_inputs
from prefopt.losses.pairwise import smoothed_sigmoid_loss


def simpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    *,
    chosen_lengths: Array,
    rejected_lengths: Array,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    xp: ModuleType | None = None,
) -> Array:
    r"""Simple Preference Optimization, per pair (TRL CPO trainer, ``loss_type="simpo"``).

    With the per-token average log-probabilities $\bar a_w = \log\pi(y_w)/|y_w|$ and
    $\bar a_l = \log\pi(y_l)/|y_l|$ and the margin $z = \beta(\bar a_w - \bar a_l) - \gamma$:

    $$
    \ell = -(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)
    $$

    $\gamma$ is subtracted *outside* $\beta(\cdot)$, as TRL's ``simpo_gamma`` is; the
    paper writes the same margin as $\beta(\bar a_w - \bar a_l - \gamma/\beta)$, so both
    mean the same number. No reference model is needed.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        chosen_lengths: (B,) token counts of the chosen responses (> 0). Required.
        rejected_lengths: (B,) token counts of the rejected responses (> 0). Required.
        beta: $\beta > 0$, the reward scale. Default 2.0.
        gamma: $\gamma \ge 0$, the target reward margin. Default 0.5.
        label_smoothing: $\varepsilon \in [0, 0.5]$. Default 0.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
        NeurIPS 2024, arXiv:2405.14734.
    """
    p = pair_inputs(simpo_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, beta=beta, gamma=gamma, label_smoothing=label_smoothing,
        xp=xp,
    ))  # fmt: skip
    minus_z = p.options["gamma"] - p.beta * (p.hw / p.lw - p.hl / p.ll)
    return smoothed_sigmoid_loss(minus_z, p.options["label_smoothing"], p.xp)


def cpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    xp: ModuleType | None = None,
) -> Array:
    r"""Contrastive Preference Optimization, per pair (TRL CPO trainer, ``loss_type="sigmoid"``).

    DPO without a reference model plus a likelihood (NLL) term on the chosen response, with
    $z = \beta(\log\pi(y_w) - \log\pi(y_l))$:

    $$
    \ell = -(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)
           + \alpha_{cpo}\,\Big(-\frac{\log\pi(y_w)}{|y_w|}\Big)
    $$

    The NLL term is the chosen response's per-token negative log-likelihood, per pair
    (TRL averages it over all chosen tokens of the batch instead: the same for equal
    lengths).

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        chosen_lengths: (B,) token counts of the chosen responses (> 0); required unless
            ``cpo_alpha`` is 0. Default ``None``.
        beta: $\beta > 0$. Default 0.1.
        cpo_alpha: $\alpha_{cpo} \ge 0$, the weight of the NLL term. Default 1.0.
        label_smoothing: $\varepsilon \in [0, 0.5]$. Default 0.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM
        Performance in Machine Translation", ICML 2024, arXiv:2401.08417.
    """
    p = pair_inputs(cpo_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
        beta=beta, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing, xp=xp,
    ))  # fmt: skip
    loss = smoothed_sigmoid_loss(p.margin(negated=True), p.options["label_smoothing"], p.xp)
    weight = p.options["cpo_alpha"]
    if isinstance(weight, float) and weight == 0.0:  # an array weight: the term stays
        return loss
    if p.lw is None:
        raise ValueError(
            "cpo_loss: chosen_lengths (token counts, shape (B,)) are required for the NLL term; "
            "got None (pass cpo_alpha=0 to drop the term)"
        )
    return loss - weight * (p.hw / p.lw)


def orpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    *,
    chosen_lengths: Array,
    rejected_lengths: Array,
    beta: float = 0.1,
    xp: ModuleType | None = None,
) -> Array:
    r"""Odds Ratio Preference Optimization, per pair (TRL ``ORPOTrainer``).

    With the per-token average log-probabilities $\bar a = \log\pi(y)/|y|$ and the log-odds
    $\log\operatorname{odds}(y) = \bar a - \log(1 - e^{\bar a})$:

    $$
    \ell = -\bar a_w - \lambda\,\log\sigma\big(\log\operatorname{odds}(y_w)
                                           - \log\operatorname{odds}(y_l)\big)
    $$

    An SFT term on the chosen response plus an odds-ratio penalty; no reference model.
    $\log(1 - e^{\bar a})$ is computed stably (``log1p(-exp)`` below $-\log 2$,
    ``log(-expm1)`` above). An average of exactly 0 (a response the model is certain of)
    has infinite odds: averages are clipped to at most $-$``tiny`` (the dtype's smallest
    normal number), which keeps the loss finite.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        chosen_lengths: (B,) token counts of the chosen responses (> 0). Required.
        rejected_lengths: (B,) token counts of the rejected responses (> 0). Required.
        beta: $\lambda > 0$, the weight of the odds-ratio term (TRL's ``beta``). Default 0.1.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per pair in the inputs' floating dtype (float32 for half precision).

    References:
        Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
        EMNLP 2024, arXiv:2403.07691.
    """
    p = pair_inputs(orpo_loss, dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, beta=beta, xp=xp,
    ))  # fmt: skip
    aw, al = p.hw / p.lw, p.hl / p.ll
    return 0.0 - aw - p.beta * log_sigmoid(_log_odds(aw, p.xp) - _log_odds(al, p.xp), xp=p.xp)


def _log_odds(a: Array, xp: ModuleType) -> Array:
    r"""$a - \log(1 - e^a)$ for a log-probability $a < 0$."""
    a = xp.clip(a, max=-float(xp.finfo(a.dtype).smallest_normal))
    # Each branch gets a safe input where it is not taken, so its gradient stays finite.
    far = a < -math.log(2.0)
    log1mexp = xp.where(
        far,
        xp.log1p(-xp.exp(xp.where(far, a, -1.0))),
        xp.log(-xp.expm1(xp.where(far, -1.0, a))),
    )
    return a - log1mexp
