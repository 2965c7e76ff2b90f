"""The loss modules: an ``nn.Module`` per registered loss, options fixed when built.

The modules hold the options and a ``reduction`` like ``torch.nn`` losses, validate the
options when built (the function's own message), pass the namespace explicitly (no lookup
per call) and trace under ``torch.compile(fullgraph=True)`` without graph breaks. Each
class is written out (for IDEs, grep and the docs) with its loss's options in its
constructor, each ``None`` by default: the loss function's own default, written there only;
``forward`` is the base class's, which takes the arrays as the loss function does.
"""

from __future__ import annotations

import types
from typing import Any

import array_api_compat.torch as torch_xp
import torch

from prefopt.losses.compose import REDUCTIONS, counted, reduce
from prefopt.losses.registry import POSITIONAL, spec


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
        options = {k: v for k, v in options.items() if v is not None}  # None: the default
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.spec = spec(self.loss, name)
        # validated here, as the function would (its own message), and frozen
        self.config = self.spec.config(options, fn=name)
        self.reduction = reduction
        self.options = options  # as given
        self._keywords = {**options, "xp": torch_xp}  # of every call

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each class gets the one forward below under a code object of its own:
        # torch.compile counts recompilations per code object (8 at most), so a shared one
        # would stop compiling after the eighth loss module of a process.
        if "forward" not in vars(cls):
            base = PreferenceLoss.forward
            code = base.__code__.replace(co_name="forward")  # a new, equal code object
            forward = types.FunctionType(code, base.__globals__, "forward", base.__defaults__)
            forward.__kwdefaults__, forward.__doc__ = base.__kwdefaults__, base.__doc__
            forward.__qualname__ = f"{cls.__name__}.forward"
            cls.forward = forward

    def forward(self, *arrays: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """The loss of a batch, reduced; the arrays as the loss function takes them.

        E.g. ``MPOLoss(beta=0.1)(logps, ref_logps, rewards, mask=mask)`` as
        ``prefopt.mpo_loss`` takes them, ``DPOLoss()(chosen_logps, rejected_logps,
        ref_chosen_logps, ref_rejected_logps)`` as ``prefopt.dpo_loss`` does.
        """
        found = self.spec
        if found.counts == "all" or self.reduction != "mean":
            loss = found.fn(*arrays, **inputs, **self._keywords)
            if self.reduction == "mean" and loss.shape[0]:  # the common case: a native mean
                return loss.mean()
            return reduce(loss, self.reduction, None, xp=torch_xp)
        bound = {**dict(zip(POSITIONAL[found.layout], arrays)), **inputs}
        if found.terms is not None:  # the loss and the groups that count: one split, not two
            args = {"ref_logps": None, **bound, **self.config.options, "xp": torch_xp}
            loss, kept = found.terms(found.fn, args)
            return reduce(loss, self.reduction, kept, xp=torch_xp)
        loss = found.fn(*arrays, **inputs, **self._keywords)
        return self.reduce(loss, bound.get("rewards"), bound.get("mask"), bound.get("chosen"))

    def reduce(self, loss, rewards=None, mask=None, chosen=None) -> torch.Tensor:
        """Reduce per-example losses as ``reduction`` says (see the class docstring)."""
        kept = None
        if self.reduction == "mean" and self.spec.counts != "all":
            kept = counted(self.spec.counts, rewards, mask, chosen, xp=torch_xp)
        return reduce(loss, self.reduction, kept, xp=torch_xp)

    def extra_repr(self) -> str:
        """The options, as ``print(module)`` shows them (the defaults filled in)."""
        parts = [f"reduction={self.reduction!r}"]
        if type(self) is PreferenceLoss:  # a class of its own already names its loss
            parts.insert(0, f"loss={self.loss!r}")
        return ", ".join(parts + [f"{k}={v!r}" for k, v in self.config.options.items()])


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """A loss class's constructor arguments (its ``locals()``), for the base class."""
    return {k: v for k, v in values.items() if k not in ("self", "__class__")}


class DPOLoss(PreferenceLoss):
    """[`prefopt.dpo_loss`][prefopt.dpo_loss] as a module.

    ``loss_module("sigmoid")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "sigmoid"

    def __init__(
        self,
        *,
        beta: float | None = None,
        label_smoothing: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class RobustDPOLoss(PreferenceLoss):
    """[`prefopt.robust_dpo_loss`][prefopt.robust_dpo_loss] as a module.

    ``loss_module("robust")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "robust"

    def __init__(
        self,
        *,
        beta: float | None = None,
        label_smoothing: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class IPOLoss(PreferenceLoss):
    """[`prefopt.ipo_loss`][prefopt.ipo_loss] as a module.

    ``loss_module("ipo")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "ipo"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class HingeLoss(PreferenceLoss):
    """[`prefopt.hinge_loss`][prefopt.hinge_loss] as a module.

    ``loss_module("hinge")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "hinge"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class EXOPairLoss(PreferenceLoss):
    """[`prefopt.exo_pair_loss`][prefopt.exo_pair_loss] as a module.

    ``loss_module("exo_pair")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "exo_pair"

    def __init__(
        self,
        *,
        beta: float | None = None,
        label_smoothing: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class NCAPairLoss(PreferenceLoss):
    """[`prefopt.nca_pair_loss`][prefopt.nca_pair_loss] as a module.

    ``loss_module("nca_pair")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "nca_pair"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class BCOPairLoss(PreferenceLoss):
    """[`prefopt.bco_pair_loss`][prefopt.bco_pair_loss] as a module.

    ``loss_module("bco_pair")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "bco_pair"

    def __init__(
        self,
        *,
        beta: float | None = None,
        delta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class SPPOHardLoss(PreferenceLoss):
    """[`prefopt.sppo_hard_loss`][prefopt.sppo_hard_loss] as a module.

    ``loss_module("sppo_hard")`` makes one too. The options are the function's (one left
    ``None`` takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``,
    ``"sum"`` or ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "sppo_hard"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class APOZeroLoss(PreferenceLoss):
    """[`prefopt.apo_zero_loss`][prefopt.apo_zero_loss] as a module.

    ``loss_module("apo_zero")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "apo_zero"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class APODownLoss(PreferenceLoss):
    """[`prefopt.apo_down_loss`][prefopt.apo_down_loss] as a module.

    ``loss_module("apo_down")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "apo_down"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class DiscoPOPLoss(PreferenceLoss):
    """[`prefopt.discopop_loss`][prefopt.discopop_loss] as a module.

    ``loss_module("discopop")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "discopop"

    def __init__(
        self,
        *,
        beta: float | None = None,
        tau: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class AOTLoss(PreferenceLoss):
    """[`prefopt.aot_loss`][prefopt.aot_loss] as a module.

    ``loss_module("aot")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "aot"

    def __init__(
        self,
        *,
        beta: float | None = None,
        label_smoothing: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class AOTUnpairedLoss(PreferenceLoss):
    """[`prefopt.aot_unpaired_loss`][prefopt.aot_unpaired_loss] as a module.

    ``loss_module("aot_unpaired")`` makes one too. The options are the function's (one left
    ``None`` takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``,
    ``"sum"`` or ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "aot_unpaired"

    def __init__(
        self,
        *,
        beta: float | None = None,
        label_smoothing: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class SigmoidNormLoss(PreferenceLoss):
    """[`prefopt.sigmoid_norm_loss`][prefopt.sigmoid_norm_loss] as a module.

    ``loss_module("sigmoid_norm")`` makes one too. The options are the function's (one left
    ``None`` takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``,
    ``"sum"`` or ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "sigmoid_norm"

    def __init__(
        self,
        *,
        beta: float | None = None,
        f_divergence: str | None = None,
        f_alpha: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class SimPOLoss(PreferenceLoss):
    """[`prefopt.simpo_loss`][prefopt.simpo_loss] as a module.

    ``loss_module("simpo")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "simpo"

    def __init__(
        self,
        *,
        beta: float | None = None,
        gamma: float | None = None,
        label_smoothing: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class CPOLoss(PreferenceLoss):
    """[`prefopt.cpo_loss`][prefopt.cpo_loss] as a module.

    ``loss_module("cpo")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "cpo"

    def __init__(
        self,
        *,
        beta: float | None = None,
        cpo_alpha: float | None = None,
        label_smoothing: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class ORPOLoss(PreferenceLoss):
    """[`prefopt.orpo_loss`][prefopt.orpo_loss] as a module.

    ``loss_module("orpo")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "orpo"

    def __init__(self, *, beta: float | None = None, reduction: str = "mean") -> None:
        super().__init__(**_given(locals()))


class KTOLoss(PreferenceLoss):
    """[`prefopt.kto_loss`][prefopt.kto_loss] as a module.

    ``loss_module("kto")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "kto"

    def __init__(
        self,
        *,
        beta: float | None = None,
        desirable_weight: float | None = None,
        undesirable_weight: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class MPOLoss(PreferenceLoss):
    """[`prefopt.mpo_loss`][prefopt.mpo_loss] as a module.

    ``loss_module("mpo")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]). ``"mean"`` averages
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
        beta: float | None = None,
        alpha: float | None = None,
        weighting: str | None = None,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class InfoNCALoss(PreferenceLoss):
    """[`prefopt.infonca_loss`][prefopt.infonca_loss] as a module.

    ``loss_module("infonca")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "infonca"

    def __init__(
        self,
        *,
        beta: float | None = None,
        tau: float | None = None,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class NCALoss(PreferenceLoss):
    """[`prefopt.nca_loss`][prefopt.nca_loss] as a module.

    ``loss_module("nca")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "nca"

    def __init__(
        self,
        *,
        beta: float | None = None,
        tau: float | None = None,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class PlackettLuceLoss(PreferenceLoss):
    """[`prefopt.plackett_luce_loss`][prefopt.plackett_luce_loss] as a module.

    ``loss_module("plackett_luce")`` makes one too. The options are the function's (one left
    ``None`` takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``,
    ``"sum"`` or ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "plackett_luce"

    def __init__(
        self,
        *,
        beta: float | None = None,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


class LiPOLoss(PreferenceLoss):
    """[`prefopt.lipo_loss`][prefopt.lipo_loss] as a module.

    ``loss_module("lipo")`` makes one too. The options are the function's (one left ``None``
    takes its default); ``reduction`` is ``"mean"`` (default), ``"batchmean"``, ``"sum"`` or
    ``"none"`` (see [`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss]).
    """

    loss = "lipo"

    def __init__(
        self,
        *,
        beta: float | None = None,
        check_values: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(**_given(locals()))


MODULES: dict[str, type[PreferenceLoss]] = {
    cls.__name__: cls for cls in PreferenceLoss.__subclasses__()
}
_BY_LOSS = {spec(cls.loss).fn: cls for cls in MODULES.values()}  # "dpo" is "sigmoid"'s

__all__ = sorted(["PreferenceLoss", "loss_module", *MODULES])


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
    cls = _BY_LOSS.get(spec(name, "loss_module").fn)
    return PreferenceLoss(loss=name, **options) if cls is None else cls(**options)
