"""nnU-Net v2 trainers that train with torch_medloss's losses: ``nnUNetv2_train ... -tr nnUNetTrainerPMDice``.

Each is an ``nnUNetTrainer`` that overrides ``_build_loss`` only: network, data, augmentation, schedule and
inference stay nnU-Net's. Label-map datasets get a softmax loss; region-based datasets (``regions_class_order`` in
dataset.json) get its sigmoid form, as nnU-Net's own trainer does. Deep supervision weights are nnU-Net's (1/2^i,
the lowest output 0, normalized).

    nnUNetTrainerDiceCE    nnU-Net's default loss, Dice + CE (DC_and_CE_loss / DC_and_BCE_loss), on fused kernels.
    nnUNetTrainerPMDice    PM Dice (gamma ``pm_gamma``) + CE; regions: PM Dice + BCE.
    nnUNetTrainerDBCE      DBCE alone, the loss the DBCE paper proposes and compares with Dice + CE.
    nnUNetTrainerDiceDBCE  nnU-Net's Dice + DBCE: the default recipe with CE replaced by DBCE.

DBCE needs mutually exclusive labels, so the two DBCE trainers refuse region-based datasets. Their radius is in
millimetres (``dbce_radius_mm``): each deep-supervision output gets the configuration's voxel spacing divided by its
scale, so the dilation covers the same physical ball at every resolution.

Every trainer also exists as ``<name>_<N>epochs`` (N in ``EPOCH_VARIANTS``) for short runs. Hyperparameters are class
attributes: subclass to change them, e.g. ``class MyPMDice(nnUNetTrainerPMDice): pm_gamma = 1.0``.

Importing this module imports nnunetv2.
"""

from __future__ import annotations

import inspect

import numpy as np
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from torch_medloss.nnunet import losses
from torch_medloss.nnunet.discovery import EPOCH_VARIANTS


class _TorchMedlossTrainer(nnUNetTrainer):
    """Builds ``_loss_for_scale`` once (or once per deep-supervision output) and wraps it as nnU-Net does."""

    ce_weight: float = 1.0  # weight of the cross-entropy term (CE, BCE or DBCE)
    dice_weight: float = 1.0  # weight of the Dice term (Dice or PM Dice)
    loss_depends_on_scale: bool = False  # True: one loss per deep-supervision output (DBCE's radius in mm)

    def _dice_kwargs(self, do_bg: bool) -> dict:
        """nnU-Net's soft Dice options for this configuration."""
        return {"batch_dice": self.configuration_manager.batch_dice, "do_bg": do_bg, "smooth": 1e-5,
                "ddp": self.is_ddp}

    def _loss_for_scale(self, scale: tuple[float, ...]) -> nn.Module:
        """The loss for an output at ``scale`` (1 at full resolution, 0.5 at half, per axis)."""
        raise NotImplementedError

    def _deep_supervision_weights(self, count: int) -> np.ndarray:
        # nnU-Net's weights, including its small nonzero last weight under DDP without torch.compile.
        weights = np.array([1 / (2**i) for i in range(count)])
        weights[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0
        return weights / weights.sum()

    def _build_loss(self):
        full_resolution = tuple(1.0 for _ in self.configuration_manager.patch_size)
        if not self.enable_deep_supervision:
            return self._loss_for_scale(full_resolution)
        scales = [tuple(float(s) for s in scale) for scale in self._get_deep_supervision_scales()]
        weights = self._deep_supervision_weights(len(scales))
        if self.loss_depends_on_scale:
            return losses.DeepSupervisionLosses([self._loss_for_scale(s) for s in scales], weights)
        return DeepSupervisionWrapper(self._loss_for_scale(full_resolution), weights)


class nnUNetTrainerDiceCE(_TorchMedlossTrainer):  # noqa: N801 - nnU-Net's naming
    """nnU-Net's default loss on torch_medloss's kernels: the same values and gradients, one fused pass."""

    def _loss_for_scale(self, scale):
        manager = self.label_manager
        if manager.has_regions:
            return losses.DC_and_BCE_loss({}, self._dice_kwargs(do_bg=True), weight_ce=self.ce_weight,
                                          weight_dice=self.dice_weight,
                                          use_ignore_label=manager.ignore_label is not None)
        return losses.DC_and_CE_loss(self._dice_kwargs(do_bg=False), {}, weight_ce=self.ce_weight,
                                     weight_dice=self.dice_weight, ignore_label=manager.ignore_label)


class nnUNetTrainerPMDice(_TorchMedlossTrainer):  # noqa: N801 - nnU-Net's naming
    """PM Dice (arXiv 2506.15744) + CE, nnU-Net's Dice settings otherwise; regions: PM Dice + BCE."""

    pm_gamma: float = 2.0  # the modulator |y - p|^gamma; 0 gives plain Dice
    pm_squared_pred: bool = True  # squared terms in the denominator, as torch_medloss.PMDiceLoss by default

    def _loss_for_scale(self, scale):
        manager = self.label_manager
        pm = {"gamma": self.pm_gamma, "squared_pred": self.pm_squared_pred}
        if manager.has_regions:
            return losses.PMDice_and_BCE_loss({}, self._dice_kwargs(do_bg=True), weight_ce=self.ce_weight,
                                              weight_dice=self.dice_weight,
                                              use_ignore_label=manager.ignore_label is not None, **pm)
        return losses.PMDice_and_CE_loss(self._dice_kwargs(do_bg=False), {}, weight_ce=self.ce_weight,
                                         weight_dice=self.dice_weight, ignore_label=manager.ignore_label, **pm)


class nnUNetTrainerDBCE(_TorchMedlossTrainer):  # noqa: N801 - nnU-Net's naming
    """DBCE (arXiv 2412.06045) alone: the paper's loss, which it reports on par with Dice + CE."""

    dice_weight = 0.0
    dbce_radius_mm: float = 3.0  # dilation radius in millimetres
    dbce_element: str = "ball"  # "ball" or "cube"
    dbce_batch: bool = False  # class weights per image (False) or over the whole batch
    loss_depends_on_scale = True

    def _loss_for_scale(self, scale):
        manager = self.label_manager
        if manager.has_regions:
            raise ValueError(f"{type(self).__name__}: DBCE needs mutually exclusive labels, and this dataset is "
                             "region-based (overlapping sigmoid outputs); use nnUNetTrainerDiceCE or "
                             "nnUNetTrainerPMDice.")
        spacing = [float(s) / f for s, f in zip(self.configuration_manager.spacing, scale, strict=True)]
        dbce = {"radius": float(self.dbce_radius_mm), "element": self.dbce_element, "spacing": spacing,
                "batch": self.dbce_batch}
        return losses.DBCE_and_DC_loss(self._dice_kwargs(do_bg=False), dbce, weight_ce=self.ce_weight,
                                       weight_dice=self.dice_weight, ignore_label=manager.ignore_label)


class nnUNetTrainerDiceDBCE(nnUNetTrainerDBCE):  # noqa: N801 - nnU-Net's naming
    """nnU-Net's Dice + DBCE: the default Dice + CE with CE replaced by DBCE (weights 1 and 1)."""

    dice_weight = 1.0


def _with_epochs(base: type, epochs: int) -> type:
    """``<base>_<epochs>epochs``: ``base`` with ``num_epochs`` set after nnUNetTrainer's ``__init__``."""

    class Variant(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_epochs = epochs

    # nnUNetTrainer records its constructor arguments from inspect.signature(self.__init__), so the override must
    # show the base signature exactly; copying it (rather than writing it out) keeps that true on every nnU-Net
    # version (2.5 had an extra unpack_dataset).
    Variant.__init__.__signature__ = inspect.signature(nnUNetTrainer.__init__)
    Variant.__name__ = Variant.__qualname__ = f"{base.__name__}_{epochs}epochs"
    Variant.__module__ = __name__
    Variant.__doc__ = f"{base.__name__} for {epochs} epochs."
    return Variant


BASE_TRAINERS = (nnUNetTrainerDiceCE, nnUNetTrainerPMDice, nnUNetTrainerDBCE, nnUNetTrainerDiceDBCE)

__all__ = [base.__name__ for base in BASE_TRAINERS]
for _base in BASE_TRAINERS:
    for _epochs in EPOCH_VARIANTS:
        _variant = _with_epochs(_base, _epochs)
        globals()[_variant.__name__] = _variant
        __all__.append(_variant.__name__)
del _base, _epochs, _variant
