"""nnU-Net v2 integration: nnU-Net's losses on torch_medloss's kernels, and trainers for ``nnUNetv2_train -tr``.

    from torch_medloss.nnunet import DC_and_CE_loss      # nnU-Net's arguments, values and gradients; no nnunetv2 import
    from torch_medloss.nnunet.trainers import nnUNetTrainerPMDice   # imports nnunetv2

``python -m torch_medloss nnunet path|install|uninstall`` makes nnU-Net find the trainers by name (discovery.py).
``import torch_medloss`` does not import this package, and this package imports nnunetv2 only in ``trainers``.
"""

from torch_medloss.nnunet.losses import (
    DBCE_and_DC_loss,
    DC_and_BCE_loss,
    DC_and_CE_loss,
    DeepSupervisionLosses,
    PMDice_and_BCE_loss,
    PMDice_and_CE_loss,
)

__all__ = [
    "DBCE_and_DC_loss",
    "DC_and_BCE_loss",
    "DC_and_CE_loss",
    "DeepSupervisionLosses",
    "PMDice_and_BCE_loss",
    "PMDice_and_CE_loss",
]
