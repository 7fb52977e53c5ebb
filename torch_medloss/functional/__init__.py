"""Functional forms of every loss and op, one module per family: check the tensors, pick the backend
(torch_medloss._backend), run the op (torch_medloss.ops).

- torch_medloss.functional.dice: the Dice family and the focal losses (one fused op: ops/dice_sums.py);
- torch_medloss.functional.dbce: DBCE, balanced cross entropy, DBCE's class weights (ops/dbce.py);
- torch_medloss.functional.concat_conv and .frequency_split: the denoising ops (ops/concat_conv.py,
  ops/frequency_split.py).
"""

from torch_medloss.functional.concat_conv import concat_conv2d
from torch_medloss.functional.dbce import balanced_ce_loss, dbce_family, dbce_loss, dilated_class_weights
from torch_medloss.functional.dice import (
    dice_ce_loss,
    dice_family,
    dice_focal_loss,
    dice_loss,
    focal_loss,
    generalized_dice_focal_loss,
    generalized_dice_loss,
    pm_dice_loss,
    tversky_loss,
)
from torch_medloss.functional.frequency_split import frequency_split

__all__ = [
    "balanced_ce_loss",
    "concat_conv2d",
    "dbce_loss",
    "dice_ce_loss",
    "dice_focal_loss",
    "dice_loss",
    "dilated_class_weights",
    "focal_loss",
    "frequency_split",
    "generalized_dice_focal_loss",
    "generalized_dice_loss",
    "pm_dice_loss",
    "tversky_loss",
]

# The families' entries, for the loss modules (not part of the public API).
_FAMILIES = (dice_family, dbce_family)
