"""Pure-PyTorch references: readable, float64-capable, the ground truth every fused backend is tested against."""

from torch_medloss.reference.dbce import balanced_ce_loss, dbce_loss, dilate, dilated_class_weights, structuring_element
from torch_medloss.reference.dice import dice_loss, generalized_dice_loss, pm_dice_loss, tversky_loss
from torch_medloss.reference.dice_ce import dice_ce_loss
from torch_medloss.reference.focal import focal_loss

__all__ = [
    "balanced_ce_loss",
    "dbce_loss",
    "dice_ce_loss",
    "dice_loss",
    "dilate",
    "dilated_class_weights",
    "focal_loss",
    "generalized_dice_loss",
    "pm_dice_loss",
    "structuring_element",
    "tversky_loss",
]
