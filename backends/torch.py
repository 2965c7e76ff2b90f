"""PyTorch backend: native ops for the core, ``nn.Module`` wrappers and ``stop_gradient``.

The loss modules hold the options and a ``reduction`` like ``torch.nn`` losses, pass the
namespace explicitly (no lookup per call) and trace under
``torch.compile(fullgraph=True)`` without graph breaks.
"""

from __future__ import annotations

import warnings
from typing import Any

import array_api_compat.torch as torch_xp
import torch

import prefopt
from prefopt.logps import label_logps, row_chunks
from prefopt.losses.compose import REDUCTIONS, counted, reduce
from prefopt.losses.group import mpo_terms
from prefopt.losses.registry import POSITIONAL, spec

# prefopt memoises dtype facts with functools caches (pure functions of dtypes), which
# torch.compile traces through; its warning that it does so is about them, and not news.
warnings.filterwarnings(
    "ignore",
    message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function "
    r"at '(_checks|_ops|group)\.py",
    category=UserWarning,
)


def log_sigmoid(x):
    return torch.nn.functional.logsigmoid(x)


def softplus(x):
    # log(1 + e^x) rounds to x above 40 in float32 and float64: the cut-off is exact there
    return torch.nn.functional.softplus(x, beta=1.0, threshold=40.0)


def logsumexp(x, *, axis, keepdims):
    return torch.logsumexp(x, dim=axis, keepdim=keepdims)


def is_concrete(x) -> bool:
    # not inside torch.compile, nor a torch.func.vmap batch (whose values cannot be read)
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_batchedtensor(x)


def all_finite(x) -> bool | None:
    return bool(torch.isfinite(x).all()) if is_concrete(x) else None


def on_host(x) -> bool:
    return x.device.type == "cpu"


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """Block gradients through ``x`` (``Tensor.detach``): for reference log-probs.

    Args:
        x: Any tensor.

    Returns:
        ``x`` detached from the autograd graph (same storage, no copy).
    """
    return x.detach()


class PreferenceLoss(torch.nn.Module):
    """Base of the loss modules, and the module of any registered loss by name.

    Each subclass names its loss (``loss``, a registered name), takes the loss's options
    with their defaults in its constructor, and its arrays in ``forward`` as the function
    does. ``PreferenceLoss(loss="ipo", beta=0.5)`` is the same module for any registered
    loss, with the arrays passed as the function takes them. ``reduction``: ``"mean"``
    (default) averages over the examples that count (every pair; for group losses the
    groups of the registry's counting rule, so that degenerate groups do not dilute the
    mean), ``"batchmean"`` divides the sum by the batch size (exact under gradient
    accumulation), ``"sum"``, or ``"none"`` (per example). A batch in which nothing counts
    gives 0 with a zero gradient.

    Args:
        reduction: ``"mean"``, ``"batchmean"``, ``"sum"`` or ``"none"``.
        loss: A registered name; subclasses set it for you.
        **options: The loss's options; one it does not take raises ``TypeError``.
    """

    loss: str | None = None  # the registered name

    def __init__(self, reduction: str = "mean", *, loss: str | None = None, **options: Any):
        super().__init__()
        name = type(self).__name__
        self.loss = loss or self.loss
        if self.loss is None:
            raise TypeError(f"{name} names no loss: use a loss module such as MPOLoss")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.spec = spec(self.loss, name)
        self.spec.checked(options, fn=name)  # a bad value fails here, as the function would
        self.reduction = reduction
        self.options = options

    def forward(self, *arrays: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as the loss function takes them."""
        bound = {**dict(zip(POSITIONAL[self.spec.layout], arrays)), **inputs}
        loss = self.spec.fn(*arrays, **inputs, **self.options, xp=torch_xp)
        return self.reduce(loss, bound.get("rewards"), bound.get("mask"), bound.get("chosen"))

    def reduce(self, loss, rewards=None, mask=None, chosen=None) -> torch.Tensor:
        """Reduce per-example losses as ``reduction`` says (see the class docstring)."""
        if self.reduction == "mean" and self.spec.counts == "all" and loss.shape[0]:
            return loss.mean()  # the common case, natively: prefopt's reduce() gives the same
        kept = None
        if self.reduction == "mean" and self.spec.counts != "all":
            kept = counted(self.spec.counts, rewards, mask, chosen, xp=torch_xp)
        return reduce(loss, self.reduction, kept, xp=torch_xp)

    def extra_repr(self) -> str:
        """The options, as ``print(module)`` shows them."""
        parts = [f"reduction={self.reduction!r}"]
        if type(self) is PreferenceLoss:  # a class of its own already names its loss
            parts.insert(0, f"loss={self.loss!r}")
        return ", ".join(parts + [f"{k}={v!r}" for k, v in self.options.items()])


class DPOLoss(PreferenceLoss):
    """[`prefopt.dpo_loss`][prefopt.dpo_loss] as a module.

    ``loss_module("sigmoid")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "sigmoid"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction,
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence=f_divergence,
            f_alpha=f_alpha,
        )

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.dpo_loss`` takes them."""
        loss = prefopt.dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class RobustDPOLoss(PreferenceLoss):
    """[`prefopt.robust_dpo_loss`][prefopt.robust_dpo_loss] as a module.

    ``loss_module("robust")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "robust"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction,
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence=f_divergence,
            f_alpha=f_alpha,
        )

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.robust_dpo_loss`` takes them."""
        loss = prefopt.robust_dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class IPOLoss(PreferenceLoss):
    """[`prefopt.ipo_loss`][prefopt.ipo_loss] as a module.

    ``loss_module("ipo")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "ipo"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps=None,
        ref_rejected_logps=None,
        *,
        chosen_lengths=None,
        rejected_lengths=None,
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.ipo_loss`` takes them."""
        loss = prefopt.ipo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class HingeLoss(PreferenceLoss):
    """[`prefopt.hinge_loss`][prefopt.hinge_loss] as a module.

    ``loss_module("hinge")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "hinge"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.hinge_loss`` takes them."""
        loss = prefopt.hinge_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class EXOPairLoss(PreferenceLoss):
    """[`prefopt.exo_pair_loss`][prefopt.exo_pair_loss] as a module.

    ``loss_module("exo_pair")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "exo_pair"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.001,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction,
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence=f_divergence,
            f_alpha=f_alpha,
        )

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.exo_pair_loss`` takes them."""
        loss = prefopt.exo_pair_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class NCAPairLoss(PreferenceLoss):
    """[`prefopt.nca_pair_loss`][prefopt.nca_pair_loss] as a module.

    ``loss_module("nca_pair")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "nca_pair"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.nca_pair_loss`` takes them."""
        loss = prefopt.nca_pair_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class BCOPairLoss(PreferenceLoss):
    """[`prefopt.bco_pair_loss`][prefopt.bco_pair_loss] as a module.

    ``loss_module("bco_pair")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "bco_pair"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        delta: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction, beta=beta, delta=delta, f_divergence=f_divergence, f_alpha=f_alpha
        )

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.bco_pair_loss`` takes them."""
        loss = prefopt.bco_pair_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class SPPOHardLoss(PreferenceLoss):
    """[`prefopt.sppo_hard_loss`][prefopt.sppo_hard_loss] as a module.

    ``loss_module("sppo_hard")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "sppo_hard"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.sppo_hard_loss`` takes them."""
        loss = prefopt.sppo_hard_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class APOZeroLoss(PreferenceLoss):
    """[`prefopt.apo_zero_loss`][prefopt.apo_zero_loss] as a module.

    ``loss_module("apo_zero")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "apo_zero"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.apo_zero_loss`` takes them."""
        loss = prefopt.apo_zero_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class APODownLoss(PreferenceLoss):
    """[`prefopt.apo_down_loss`][prefopt.apo_down_loss] as a module.

    ``loss_module("apo_down")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "apo_down"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.apo_down_loss`` takes them."""
        loss = prefopt.apo_down_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class DiscoPOPLoss(PreferenceLoss):
    """[`prefopt.discopop_loss`][prefopt.discopop_loss] as a module.

    ``loss_module("discopop")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "discopop"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        tau: float = 0.05,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, tau=tau, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.discopop_loss`` takes them."""
        loss = prefopt.discopop_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class AOTLoss(PreferenceLoss):
    """[`prefopt.aot_loss`][prefopt.aot_loss] as a module.

    ``loss_module("aot")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "aot"

    def __init__(
        self, *, beta: float = 0.1, label_smoothing: float = 0.0, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction, beta=beta, label_smoothing=label_smoothing)

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.aot_loss`` takes them."""
        loss = prefopt.aot_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class AOTUnpairedLoss(PreferenceLoss):
    """[`prefopt.aot_unpaired_loss`][prefopt.aot_unpaired_loss] as a module.

    ``loss_module("aot_unpaired")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "aot_unpaired"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction,
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence=f_divergence,
            f_alpha=f_alpha,
        )

    def forward(
        self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.aot_unpaired_loss`` takes them."""
        loss = prefopt.aot_unpaired_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class SigmoidNormLoss(PreferenceLoss):
    """[`prefopt.sigmoid_norm_loss`][prefopt.sigmoid_norm_loss] as a module.

    ``loss_module("sigmoid_norm")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "sigmoid_norm"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, f_divergence=f_divergence, f_alpha=f_alpha)

    def forward(
        self,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps=None,
        ref_rejected_logps=None,
        *,
        chosen_lengths=None,
        rejected_lengths=None,
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.sigmoid_norm_loss`` takes them."""
        loss = prefopt.sigmoid_norm_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class SimPOLoss(PreferenceLoss):
    """[`prefopt.simpo_loss`][prefopt.simpo_loss] as a module.

    ``loss_module("simpo")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "simpo"

    def __init__(
        self,
        *,
        beta: float = 2.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, gamma=gamma, label_smoothing=label_smoothing)

    def forward(
        self, chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.simpo_loss`` takes them."""
        loss = prefopt.simpo_loss(
            chosen_logps,
            rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class CPOLoss(PreferenceLoss):
    """[`prefopt.cpo_loss`][prefopt.cpo_loss] as a module.

    ``loss_module("cpo")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "cpo"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        cpo_alpha: float = 1.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing)

    def forward(self, chosen_logps, rejected_logps, *, chosen_lengths=None) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.cpo_loss`` takes them."""
        loss = prefopt.cpo_loss(
            chosen_logps, rejected_logps, chosen_lengths=chosen_lengths, **self.options, xp=torch_xp
        )
        return self.reduce(loss)


class ORPOLoss(PreferenceLoss):
    """[`prefopt.orpo_loss`][prefopt.orpo_loss] as a module.

    ``loss_module("orpo")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "orpo"

    def __init__(self, *, beta: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(reduction, beta=beta)

    def forward(
        self, chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.orpo_loss`` takes them."""
        loss = prefopt.orpo_loss(
            chosen_logps,
            rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **self.options,
            xp=torch_xp,
        )
        return self.reduce(loss)


class KTOLoss(PreferenceLoss):
    """[`prefopt.kto_loss`][prefopt.kto_loss] as a module.

    ``loss_module("kto")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "kto"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )

    def forward(self, logps, ref_logps, desirable, *, kl=0.0) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.kto_loss`` takes them."""
        loss = prefopt.kto_loss(logps, ref_logps, desirable, kl=kl, **self.options, xp=torch_xp)
        return self.reduce(loss)


class MPOLoss(PreferenceLoss):
    """[`prefopt.mpo_loss`][prefopt.mpo_loss] as a module.

    ``loss_module("mpo")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]). ``"mean"`` averages
    over the groups that count (both sets non-empty, see
    [`prefopt.mpo_split`][prefopt.mpo_split]), so degenerate groups do not dilute it.

    Examples:
        >>> import torch
        >>> from prefopt.backends.torch import MPOLoss
        >>> loss_fn = MPOLoss(beta=0.1, alpha=1.0, weighting="abs")
        >>> logps = torch.randn(4, 8, requires_grad=True)
        >>> loss = loss_fn(logps, None, torch.rand(4, 8))
        >>> loss.backward()
    """

    loss = "mpo"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        alpha: float = 1.0,
        weighting: str = "abs",
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            reduction, beta=beta, alpha=alpha, weighting=weighting, check_values=check_values
        )

    def forward(
        self, logps, ref_logps, rewards, *, mask=None, chosen=None, lengths=None
    ) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.mpo_loss`` takes them."""
        arrays = {"logps": logps, "ref_logps": ref_logps, "rewards": rewards, "mask": mask}
        arrays.update(chosen=chosen, lengths=lengths, xp=torch_xp)
        loss, counted = mpo_terms("MPOLoss", {**arrays, **self.options})
        return reduce(loss, self.reduction, counted, xp=torch_xp)  # one split, not two


class InfoNCALoss(PreferenceLoss):
    """[`prefopt.infonca_loss`][prefopt.infonca_loss] as a module.

    ``loss_module("infonca")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "infonca"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        tau: float = 1.0,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, tau=tau, check_values=check_values)

    def forward(self, logps, ref_logps, rewards, *, mask=None, lengths=None) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.infonca_loss`` takes them."""
        loss = prefopt.infonca_loss(
            logps, ref_logps, rewards, mask=mask, lengths=lengths, **self.options, xp=torch_xp
        )
        return self.reduce(loss, rewards, mask)


class NCALoss(PreferenceLoss):
    """[`prefopt.nca_loss`][prefopt.nca_loss] as a module.

    ``loss_module("nca")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "nca"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        tau: float = 1.0,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction, beta=beta, tau=tau, check_values=check_values)

    def forward(self, logps, ref_logps, rewards, *, mask=None, lengths=None) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.nca_loss`` takes them."""
        loss = prefopt.nca_loss(
            logps, ref_logps, rewards, mask=mask, lengths=lengths, **self.options, xp=torch_xp
        )
        return self.reduce(loss, rewards, mask)


class PlackettLuceLoss(PreferenceLoss):
    """[`prefopt.plackett_luce_loss`][prefopt.plackett_luce_loss] as a module.

    ``loss_module("plackett_luce")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "plackett_luce"

    def __init__(
        self, *, beta: float = 0.1, check_values: bool | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction, beta=beta, check_values=check_values)

    def forward(self, logps, ref_logps, rewards, *, mask=None, lengths=None) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.plackett_luce_loss`` takes them."""
        loss = prefopt.plackett_luce_loss(
            logps, ref_logps, rewards, mask=mask, lengths=lengths, **self.options, xp=torch_xp
        )
        return self.reduce(loss, rewards, mask)


class LiPOLoss(PreferenceLoss):
    """[`prefopt.lipo_loss`][prefopt.lipo_loss] as a module.

    ``loss_module("lipo")`` makes one too. The options are the function's, with its
    defaults; ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or ``"none"``
    (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "lipo"

    def __init__(
        self, *, beta: float = 0.1, check_values: bool | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction, beta=beta, check_values=check_values)

    def forward(self, logps, ref_logps, rewards, *, mask=None, lengths=None) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as ``prefopt.lipo_loss`` takes them."""
        loss = prefopt.lipo_loss(
            logps, ref_logps, rewards, mask=mask, lengths=lengths, **self.options, xp=torch_xp
        )
        return self.reduce(loss, rewards, mask)


MODULES: dict[str, type[PreferenceLoss]] = {
    cls.__name__: cls for cls in PreferenceLoss.__subclasses__()
}

__all__ = sorted(["PreferenceLoss", "fused_linear_logps", "loss_module", "stop_gradient", *MODULES])


def loss_module(name: str, **options: Any) -> PreferenceLoss:
    """The module of a registered loss, by name (TRL's ``loss_type`` strings).

    Args:
        name: A name from [`prefopt.available_losses`][prefopt.available_losses].
        **options: ``reduction`` and the keyword options of the loss.

    Returns:
        An instance of the loss's module class, e.g. ``IPOLoss(beta=0.5)`` for
        ``loss_module("ipo", beta=0.5)``; a ``PreferenceLoss(loss=name)`` for a registered
        loss that has no class of its own.

    Examples:
        >>> from prefopt.backends.torch import loss_module
        >>> loss_module("ipo", beta=0.2)
        IPOLoss(reduction='mean', beta=0.2, f_divergence='reverse_kl', f_alpha=0.5)
    """
    cls = MODULES.get(spec(name, "loss_module").title + "Loss")
    return PreferenceLoss(loss=name, **options) if cls is None else cls(**options)


class _FusedLinearLogps(torch.autograd.Function):
    """Token log-probs of ``hidden @ weight.T + bias``, chunk by chunk (see ``fused_linear_logps``).

    Every matmul runs in the inputs' dtype; the log-sum-exp, the log-probs, the logits'
    gradient and the weight gradient summed over chunks are float32 (float64 inputs: float64).
    Forward keeps one log-sum-exp per row and, within ``saved_bytes``, the logits of the
    first chunks; backward recomputes the logits of the others.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, chunk_size, saved_bytes):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        kept = []
        for start, stop in row_chunks(hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[start:stop], weight, bias)
            out[start:stop], lse[start:stop] = label_logps(
                logits.to(acc), labels[start:stop], _IGNORED, torch_xp
            )
            size = logits.numel() * logits.element_size()
            kept.append(logits if size <= saved_bytes else None)
            saved_bytes -= size if size <= saved_bytes else 0
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse)
        ctx.chunk_size, ctx.kept = chunk_size, kept
        return torch.where(valid, out, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # as in forward
            return _fused_backward(ctx, grad_out)


def _fused_backward(ctx, grad_out):
    """The gradients of ``hidden``, ``weight`` and ``bias``, one chunk at a time."""
    hidden, weight, bias, labels, valid, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_out = torch.where(valid, grad_out, 0.0)
    chunks = list(row_chunks(hidden.shape[0], ctx.chunk_size))
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None  # one chunk: its product; several: summed in float32
    if need_weight and len(chunks) > 1:
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype)
    grad_bias = torch.zeros_like(bias, dtype=lse.dtype) if need_bias else None
    for c, (start, stop) in enumerate(chunks):
        h, g = hidden[start:stop], grad_out[start:stop]
        kept, ctx.kept[c] = ctx.kept[c], None  # a second backward recomputes
        logits = _chunk_logits(h, weight, bias) if kept is None else kept
        # d log p_y / d logits = onehot(y) - softmax(logits): built in place on the chunk
        # (on a copy of kept logits; recomputed ones are the chunk's own)
        grad_logits = logits.to(lse.dtype, copy=kept is not None)
        grad_logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])
        grad_logits.scatter_add_(-1, labels[start:stop, None], g[:, None])
        if need_bias:
            grad_bias += grad_logits.sum(dim=0)
        grad_logits = grad_logits.to(hidden.dtype)  # the matmuls in the inputs' dtype
        if need_weight and grad_weight is None:
            grad_weight = grad_logits.T @ h
        elif need_weight and grad_weight.dtype == h.dtype:
            grad_weight.addmm_(grad_logits.T, h)
        elif need_weight:
            grad_weight += grad_logits.T @ h
        if need_hidden:
            grad_hidden[start:stop] = grad_logits @ weight
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


_IGNORED = -1  # labels inside the Function are all >= 0: ``valid`` masks the ignored rows


def _chunk_logits(hidden, weight, bias):
    """One chunk's logits in the inputs' dtype."""
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def fused_linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    keep_logits_bytes: int = 0,
) -> torch.Tensor:
    r"""Token log-probabilities from the last hidden states, without the logits tensor.

    $$
    \log p_t = z_{t, y_t} - \log\sum_v e^{z_{t,v}}, \qquad z_t = W h_t + b
    $$

    computed ``chunk_size`` rows (token positions) at a time (an ``autograd.Function``).
    Forward keeps one log-sum-exp per row and the logits of the first chunks up to
    ``keep_logits_bytes``; backward reuses those, recomputes the logits of the other
    chunks, and accumulates the gradients of ``hidden``, ``weight`` and ``bias``. Peak
    memory is the kept logits plus one (chunk_size, V) float32 block, instead of the
    (rows, V) logits and their gradient; the price is a second logits matmul in backward
    for the chunks not kept. Keeping or recomputing gives bit-identical results.

    **Precision.** Every matmul runs in the compute dtype: the inputs' dtype, or under
    ``torch.autocast`` the autocast dtype (float32 inputs are then cast to it, as an
    ``nn.Linear`` would be; float64 inputs are not). The log-sum-exp, the log-probs, the
    logits' gradient and the weight gradient summed over chunks are float32 (float64 for
    float64 inputs). Values and gradients match
    ``token_logps(hidden @ weight.T + bias, labels)`` computed in the same dtype.

    Labels are **not** shifted (see [`prefopt.shift_labels`][prefopt.shift_labels]); rows
    with ``ignore_index`` give 0 and no gradient. Row chunks never change a result: the
    sequence sums, and a group's responses, are assembled afterwards from all rows, so a
    group never straddles anything the loss sees.

    Args:
        hidden: (..., H) final hidden states (before the output projection), e.g.
            (B, n, T, H) for n responses per prompt.
        weight: (V, H) output-embedding matrix (``model.lm_head.weight``), of the dtype of
            ``hidden`` (under autocast: any float dtype autocast casts).
        labels: (...) token ids in [0, V), or ``ignore_index``.
        bias: (V,) output bias, or ``None`` (the default; most LMs have none).
        ignore_index: Default -100.
        chunk_size: Rows per chunk. Default 1024.
        keep_logits_bytes: Most bytes of logits (in the compute dtype) kept from forward
            for backward instead of recomputed: less time, more memory from forward to
            backward. Default 0: every chunk is recomputed, the least memory.

    Returns:
        (...) log-probabilities in float32 (float64 for float64 inputs).

    Examples:
        >>> import torch
        >>> from prefopt.backends.torch import fused_linear_logps
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> weight = torch.randn(100, 16, requires_grad=True)
        >>> labels = torch.randint(0, 100, (2, 5))
        >>> fused_linear_logps(hidden, weight, labels).sum().backward()
    """
    from prefopt.logps import check_fused_inputs

    check_fused_inputs(hidden, weight, bias, labels, chunk_size, ignore_index, torch_xp)
    if keep_logits_bytes < 0:
        raise ValueError(
            f"fused_linear_logps: keep_logits_bytes must be >= 0; got {keep_logits_bytes}"
        )
    where = hidden.device.type
    if torch.is_autocast_enabled(where):  # the output layer in the autocast dtype
        low = torch.get_autocast_dtype(where)
        cast = lambda x: x if x is None or x.dtype == torch.float64 else x.to(low)  # noqa: E731
        hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:  # a torch matmul does not promote
            raise TypeError(
                f"fused_linear_logps: {name} must have the dtype of hidden, {hidden.dtype}; "
                f"got {x.dtype} (cast hidden or {name}: the output layer runs in one dtype)"
            )
    lead = hidden.shape[:-1]
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    with torch.autocast(where, enabled=False):  # the dtypes are set: nothing recasts them
        out = _FusedLinearLogps.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            bias,
            torch.where(valid, flat_labels, 0),  # in range for backward's scatter; masked after
            valid,
            int(chunk_size),
            int(keep_logits_bytes),
        )
    return out.reshape(lead)
