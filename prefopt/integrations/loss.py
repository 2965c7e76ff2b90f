"""The training loss of a group batch's log-probs, and its metrics.

For the PyTorch and JAX steps alike (any array library).
"""

from __future__ import annotations

from typing import Any

import prefopt
from prefopt._ops import get_namespace, stop_gradient
from prefopt.losses.registry import spec

__all__ = ["group_loss_and_metrics"]


def group_loss_and_metrics(
    loss: str,
    logps: Any,
    ref_logps: Any,
    batch: dict[str, Any],
    lengths: Any,
    *,
    pairs: str = "all",
    options: dict[str, Any] | None = None,
    with_metrics: bool = True,
) -> tuple[Any, dict[str, Any] | None]:
    """The training loss of a group batch's log-probs, and its metrics (both integrations).

    The PyTorch and JAX ``loss_and_metrics`` compute the log-probs and call this. The loss
    is [`prefopt.batch_loss`][prefopt.batch_loss] with the loss's own defaults for the
    options not given; the metrics are
    [`group_metrics`][prefopt.metrics.group_metrics] (no gradient) with the ``beta`` the
    loss used, per token when the loss averages log-probs per token (reference-free).

    Args:
        loss: A registered loss name.
        logps: (B, n) summed response log-probs under the policy.
        ref_logps: (B, n) under the reference, or ``None``; dropped for reference-free losses.
        batch: The batch's ``rewards`` and ``mask``, each (B, n).
        lengths: (B, n) response token counts, given to the loss where it uses them
            ([`LossSpec.uses_lengths`][prefopt.losses.registry.LossSpec.uses_lengths]).
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        options: Options of the loss; the others keep the loss's defaults.
        with_metrics: Compute the metrics. Default ``True``; ``False`` (the second and
            later losses of a weighted sum, whose metrics would be the first one's) gives
            ``None`` for them.

    Returns:
        ``(loss, metrics)``: a 0-d array and a dict of 0-d arrays (or ``None``).
    """
    found = spec(loss, "loss_and_metrics")
    options = found.options(options, fn="loss_and_metrics")
    if found.reference == "none":
        ref_logps = None
    value = prefopt.batch_loss(
        loss,
        logps,
        ref_logps,
        batch["rewards"],
        mask=batch["mask"],
        lengths=lengths if found.uses_lengths(ref_logps is not None) else None,
        pairs=pairs,
        **options,
    )
    if not with_metrics:
        return value, None
    per_token = ref_logps is None and found.lengths in ("optional", "required")
    xp = get_namespace(logps)
    metrics = prefopt.metrics.group_metrics(
        stop_gradient(logps, xp=xp),
        ref_logps,
        batch["rewards"],
        mask=batch["mask"],
        lengths=lengths if per_token else None,
        beta=options["beta"],
        xp=xp,
    )
    return value, metrics
