"""The training loss of a group batch's log-probs, and its metrics.

For the PyTorch and JAX steps alike (any array library).
"""

from __future__ import annotations

from typing import Any

import prefopt
from prefopt._ops import get_namespace, stop_gradient
from prefopt.losses.compose import PAIRS
from prefopt.losses.registry import spec

__all__ = ["engine_loss", "group_loss_and_metrics"]


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


def engine_loss(
    loss: str,
    loss_options: dict[str, Any] | None,
    pairs: str,
    where: str,
    n: int | None = None,
) -> dict[str, Any]:
    """The checked options of a loss on a GRPO engine (TRL's or tunix's), or one line why not.

    The loss must be registered and train on groups of ``n`` completions (a batch-sorting
    loss cannot; ``n=None``: checked with 2); ``pairs`` (``"all"`` or ``"best_worst"``) is
    for a pairwise loss only; the options are checked with the loss's own messages.

    Args:
        loss: A registered loss name.
        loss_options: Its options, or ``None``: its defaults.
        pairs: ``"all"`` or ``"best_worst"``.
        where: The caller's name, for the messages.
        n: ``num_generations``, if known.

    Returns:
        Every option of the loss, the defaults filled in.
    """
    found = spec(loss, f"{where}: loss")
    if pairs not in PAIRS:
        raise ValueError(f"{where}: pairs must be 'all' or 'best_worst'; got {pairs!r}")
    if pairs != "all" and found.kind == "group":
        raise ValueError(
            f"{where}: pairs={pairs!r} is for a pairwise loss; {loss!r} takes whole groups"
        )
    why = found.refuses_groups(2)  # a batch-sorting loss
    if why:
        raise ValueError(f"{where}: loss {loss!r} {why}; use a group loss")
    options = dict(found.config(loss_options, fn=where).options)
    why = found.refuses_groups(n) if n is not None else None
    if why:
        raise ValueError(f"{where}: loss {loss!r} {why}; set num_generations=2 (got {n})")
    return options
