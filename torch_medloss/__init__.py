"""torch_medloss: fused, exact medical-segmentation losses and denoising ops for PyTorch.

Importing the package never builds C++ or touches a GPU; compiled kernels are built on first use (or by
``python -m torch_medloss build``) and every op falls back to its pure-PyTorch reference, with one warning, when
they cannot be built.
"""

from torch_medloss import functional, nn
from torch_medloss.losses import (
    BalancedCELoss,
    DBCELoss,
    DiceCELoss,
    DiceFocalLoss,
    DiceLoss,
    FocalLoss,
    GeneralizedDiceFocalLoss,
    GeneralizedDiceLoss,
    PMDiceLoss,
    TverskyLoss,
)

__version__ = "0.1.0"

__all__ = [
    "BalancedCELoss",
    "DBCELoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "GeneralizedDiceFocalLoss",
    "GeneralizedDiceLoss",
    "PMDiceLoss",
    "TverskyLoss",
    "functional",
    "nn",
]
