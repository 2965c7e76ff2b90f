"""What only PyTorch can do: loss modules, the fused output layer, the core's native ops.

Three files, one thing each:

- ``modules.py``: an ``nn.Module`` per loss
  ([`PreferenceLoss`][prefopt.backends.torch.PreferenceLoss] and its subclasses,
  [`loss_module`][prefopt.backends.torch.loss_module]).
- ``fused.py``: [`fused_linear_logps`][prefopt.backends.torch.fused_linear_logps], token
  log-probs of the output layer without the logits tensor.
- ``ops.py``: the native ops that ``prefopt._ops`` delegates to for tensors (the contract:
  ``prefopt._ops.NATIVE_OPS``), and [`stop_gradient`][prefopt.backends.torch.stop_gradient].

Import from here (``from prefopt.backends.torch import MPOLoss``); the file names are for
readers.
"""

from prefopt.backends.torch.fused import fused_linear_logps
from prefopt.backends.torch.modules import MODULES as MODULES
from prefopt.backends.torch.modules import (
    AOTLoss,
    AOTUnpairedLoss,
    APODownLoss,
    APOZeroLoss,
    BCOPairLoss,
    CPOLoss,
    DiscoPOPLoss,
    DPOLoss,
    EXOPairLoss,
    HingeLoss,
    InfoNCALoss,
    IPOLoss,
    KTOLoss,
    LiPOLoss,
    MPOLoss,
    NCALoss,
    NCAPairLoss,
    ORPOLoss,
    PlackettLuceLoss,
    PreferenceLoss,
    RobustDPOLoss,
    SigmoidNormLoss,
    SimPOLoss,
    SPPOHardLoss,
    loss_module,
)
from prefopt.backends.torch.ops import stop_gradient

__all__ = [
    "AOTLoss",
    "AOTUnpairedLoss",
    "APODownLoss",
    "APOZeroLoss",
    "BCOPairLoss",
    "CPOLoss",
    "DPOLoss",
    "DiscoPOPLoss",
    "EXOPairLoss",
    "HingeLoss",
    "IPOLoss",
    "InfoNCALoss",
    "KTOLoss",
    "LiPOLoss",
    "MPOLoss",
    "NCALoss",
    "NCAPairLoss",
    "ORPOLoss",
    "PlackettLuceLoss",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SPPOHardLoss",
    "SigmoidNormLoss",
    "SimPOLoss",
    "fused_linear_logps",
    "loss_module",
    "stop_gradient",
]
