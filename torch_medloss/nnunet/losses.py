"""nnU-Net v2's compound losses on torch_medloss's kernels, under nnU-Net's names and with its arguments.

``DC_and_CE_loss`` and ``DC_and_BCE_loss`` take the constructor arguments of nnunetv2.training.loss.compound_losses
and return its values (nnU-Net's sign: ``weight_ce * CE - weight_dice * Dice``, so logs compare with nnU-Net's) and
gradients. ``PMDice_and_CE_loss``, ``PMDice_and_BCE_loss`` and ``DBCE_and_DC_loss`` are the same recipe with PM Dice
in place of Dice, or DBCE in place of CE. None of this imports nnunetv2.

How each call runs:
    * DC_and_CE_loss without an ignore label: one fused Dice+CE pass (``torch_medloss.DiceCELoss``) minus
      ``weight_dice`` (our Dice loss is 1 - Dice, nnU-Net's is -Dice).
    * With an ignore label: fused Dice with ``ignore_index`` (the masked sums of nnU-Net's
      MemoryEfficientSoftDiceLoss) plus torch's cross entropy summed over the valid voxels and divided by their
      count, at least 1: nnU-Net's mean, and its 0 when every voxel is ignored, without its host sync.
    * DDP with batch Dice: the Dice sums are summed over the ranks with autograd (as nnU-Net's all-gather) while the
      cross entropy stays the rank's own, so the Dice and CE parts run separately there.
    * Region-based (sigmoid) losses: fused sigmoid Dice plus torch's BCE-with-logits. Ignored voxels get the logit
      -1e4 (sigmoid exactly 0) and target 0, which makes every Dice sum and the BCE sum exactly nnU-Net's masked ones,
      with zero gradient there.
    * A Dice nnU-Net configures that the kernels do not cover (``clip_tp``, ``smooth`` below 1e-8 where nnU-Net's
      clamp of the denominator matters, or a ``dice_class`` other than nnU-Net's two soft Dice classes) runs
      ``dice_class`` itself, as nnU-Net does; so do ``ce_kwargs`` other than ``label_smoothing`` through torch's
      cross entropy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as torch_f

import torch_medloss

__all__ = [
    "DBCE_and_DC_loss",
    "DC_and_BCE_loss",
    "DC_and_CE_loss",
    "DeepSupervisionLosses",
    "PMDice_and_BCE_loss",
    "PMDice_and_CE_loss",
]

# nnU-Net's soft Dice classes compute the same quantity (SoftDiceLoss from tp/fp/fn, the memory-efficient one from
# intersection and sums); either one, named by the caller, runs on our kernels.
_NNUNET_SOFT_DICE = {"nnunetv2.training.loss.dice.SoftDiceLoss",
                     "nnunetv2.training.loss.dice.MemoryEfficientSoftDiceLoss"}
_SOFT_DICE_KEYS = ("batch_dice", "do_bg", "smooth", "ddp", "clip_tp")
# Logit of an ignored voxel in the region-based losses: sigmoid(-1e4) and log1p(exp(-1e4)) are exactly 0 in float32,
# and -1e4 is finite in float16 and bfloat16.
_MASKED_LOGIT = -1e4
# nnU-Net clamps the Dice denominator at 1e-8; with a smooth term at least that large the clamp never acts.
_SMALLEST_FUSED_SMOOTH = 1e-8


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return float(value)


def _check_kwargs(name: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(value).__name__}.")
    return dict(value)  # a copy: nnU-Net writes into the caller's dict, we do not


def _soft_dice_options(soft_dice_kwargs: object) -> dict:
    """nnU-Net's soft Dice keyword arguments with its defaults filled in."""
    kwargs = _check_kwargs("soft_dice_kwargs", soft_dice_kwargs)
    unknown = sorted(set(kwargs) - set(_SOFT_DICE_KEYS))
    if unknown:
        raise TypeError(f"soft_dice_kwargs has unexpected keys {unknown}; nnU-Net's soft Dice takes "
                        f"{', '.join(_SOFT_DICE_KEYS)}.")
    options = {"batch_dice": False, "do_bg": True, "smooth": 1.0, "ddp": True, "clip_tp": None, **kwargs}
    if isinstance(options["smooth"], bool) or not isinstance(options["smooth"], (int, float)):
        raise TypeError(f"soft_dice_kwargs['smooth'] must be a number, got {type(options['smooth']).__name__}.")
    return options


def _is_nnunet_soft_dice(dice_class: object) -> bool:
    return dice_class is None or f"{dice_class.__module__}.{dice_class.__qualname__}" in _NNUNET_SOFT_DICE


def _dice_runs_fused(dice_class: object, options: dict) -> bool:
    return (_is_nnunet_soft_dice(dice_class) and options["clip_tp"] is None
            and options["smooth"] >= _SMALLEST_FUSED_SMOOTH)


def _nnunet_dice_module(dice_class: object, apply_nonlin, options: dict) -> nn.Module:
    """The Dice nnU-Net itself would build (for configurations our kernels do not cover)."""
    if dice_class is None:
        try:
            from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss
        except ImportError as exc:
            raise ValueError("soft_dice_kwargs asks for clip_tp or a smooth below 1e-8, which only nnU-Net's own "
                             f"soft Dice computes, and nnunetv2 cannot be imported ({exc}).") from None
        dice_class = SoftDiceLoss if options["clip_tp"] is not None else MemoryEfficientSoftDiceLoss
    kwargs = {k: v for k, v in options.items() if not (k == "clip_tp" and v is None)}
    return dice_class(apply_nonlin=apply_nonlin, **kwargs)


def _distributed_dice(options: dict) -> bool:
    """nnU-Net all-gathers the Dice sums (with gradient) when ddp and batch Dice are on inside a process group."""
    return (bool(options["ddp"]) and bool(options["batch_dice"]) and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _dice_module_options(options: dict) -> dict:
    """torch_medloss Dice-family arguments equal to nnU-Net's soft Dice with these options."""
    return {"include_background": bool(options["do_bg"]), "smooth_nr": float(options["smooth"]),
            "smooth_dr": float(options["smooth"]), "batch": bool(options["batch_dice"]),
            "distributed": "auto" if options["ddp"] else "off"}


def _softmax_dim1(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Softmax losses on label maps (B, 1, *S).

class _LabelMapCompound(nn.Module):
    """weight_ce * CE term + weight_dice * (Dice-like loss - 1); logits (B, C, *S), labels (B, 1, *S) or (B, *S)."""

    def __init__(self, soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label) -> None:
        super().__init__()
        self.weight_ce = _check_weight("weight_ce", weight_ce)
        self.weight_dice = _check_weight("weight_dice", weight_dice)
        if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
            raise TypeError(f"ignore_label must be an int or None, got {type(ignore_label).__name__}.")
        self.ignore_label = ignore_label
        self.dice_options = _soft_dice_options(soft_dice_kwargs)
        self.ce_kwargs = _check_kwargs("ce_kwargs", ce_kwargs)
        if ignore_label is not None:
            self.ce_kwargs["ignore_index"] = ignore_label
        # Cross entropy as nnU-Net's RobustCrossEntropyLoss computes it, for the cases the sum/count form below
        # cannot reproduce (class weights, another reduction).
        self.ce = nn.CrossEntropyLoss(**self.ce_kwargs)
        self._plain_ce = set(self.ce_kwargs) <= {"label_smoothing", "ignore_index"}

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """nnU-Net's Dice term (-Dice), ignore label masked."""
        raise NotImplementedError

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        labels = target[:, 0].long()
        if self.ignore_label is None:
            return self.ce(logits, labels)
        if self._plain_ce:
            total = torch_f.cross_entropy(logits, labels, reduction="sum", **self.ce_kwargs)
            return total / valid.sum().clamp_min(1)
        # nnU-Net skips CE when nothing is valid (its mean would be NaN); that needs the count on the host.
        return self.ce(logits, labels) if valid.any() else logits.new_zeros(())

    def _label_map(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target as (B, 1, *S), nnU-Net's layout; (B, *S) gets the channel axis added."""
        if not isinstance(target, torch.Tensor) or not isinstance(logits, torch.Tensor):
            raise TypeError("net_output and target must be tensors.")
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.ndim != logits.ndim or target.shape[1] != 1:
            raise ValueError(f"target must be a label map (B, 1, *S) or (B, *S) for net_output "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}.")
        return target

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = self._label_map(net_output, target)
        valid = target != self.ignore_label if self.ignore_label is not None else None
        dice = self._dice(net_output, target) if self.weight_dice != 0 else 0
        ce = self._cross_entropy(net_output, target, valid) if self.weight_ce != 0 else 0
        return self.weight_ce * ce + self.weight_dice * dice


class DC_and_CE_loss(_LabelMapCompound):  # noqa: N801 - nnU-Net's name
    """nnU-Net's default loss, ``weight_ce * CE - weight_dice * Dice`` (softmax, label maps), on fused kernels.

    Args (nnU-Net's): soft_dice_kwargs ({'batch_dice', 'do_bg', 'smooth', 'ddp'} and, with SoftDiceLoss,
    'clip_tp'; nnU-Net's defaults), ce_kwargs (torch CrossEntropyLoss's), weight_ce, weight_dice (>= 0),
    ignore_label (int or None), dice_class (None, nnU-Net's SoftDiceLoss or MemoryEfficientSoftDiceLoss: all the same
    Dice, fused; any other class runs as given).

    ``dc`` is the Dice term as a module of its own (our kernels, or ``dice_class``); ``forward`` runs the fused
    Dice+CE when it can, so replacing ``dc`` changes only the other paths.
    """

    def __init__(self, soft_dice_kwargs: dict, ce_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 ignore_label: int | None = None, dice_class: type | None = None) -> None:
        super().__init__(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label)
        options = self.dice_options
        if _dice_runs_fused(dice_class, options):
            self.dc = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, ignore_index=ignore_label,
                                             **_dice_module_options(options))
            self._fused_dc = True
        else:
            self.dc = _nnunet_dice_module(dice_class, _softmax_dim1, options)
            self._fused_dc = False
        # One pass for both terms; only where CE and Dice see the same voxels and CE is the plain mean.
        self._dice_ce = None
        if self._fused_dc and ignore_label is None and set(self.ce_kwargs) <= {"label_smoothing"}:
            self._dice_ce = torch_medloss.DiceCELoss(
                to_onehot_y=True, softmax=True, lambda_dice=self.weight_dice, lambda_ce=self.weight_ce,
                label_smoothing=float(self.ce_kwargs.get("label_smoothing", 0.0)),
                **{**_dice_module_options(options), "distributed": "off"})

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._fused_dc:
            return self.dc(logits, target) - 1
        if self.ignore_label is None:
            return self.dc(logits, target)
        valid = target != self.ignore_label
        return self.dc(logits, torch.where(valid, target, 0), loss_mask=valid)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._dice_ce is not None and not _distributed_dice(self.dice_options):
            return self._dice_ce(net_output, self._label_map(net_output, target)) - self.weight_dice
        return super().forward(net_output, target)


class PMDice_and_CE_loss(_LabelMapCompound):  # noqa: N801 - named after nnU-Net's DC_and_CE_loss
    """``weight_ce * CE - weight_dice * PM Dice``: DC_and_CE_loss with the Pixel-wise Modulated Dice.

    PM Dice (arXiv 2506.15744, ``torch_medloss.PMDiceLoss``) weighs each voxel's Dice sums by |y - p|^gamma;
    ``gamma=0`` with ``squared_pred=False`` is nnU-Net's Dice exactly. Other arguments as DC_and_CE_loss.
    """

    def __init__(self, soft_dice_kwargs: dict, ce_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 ignore_label: int | None = None, gamma: float = 2.0, squared_pred: bool = True) -> None:
        super().__init__(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label)
        if self.dice_options["clip_tp"] is not None:
            raise ValueError("soft_dice_kwargs['clip_tp'] is not supported by PM Dice.")
        self.dc = torch_medloss.PMDiceLoss(gamma=gamma, squared_pred=squared_pred, to_onehot_y=True, softmax=True,
                                           ignore_index=ignore_label, **_dice_module_options(self.dice_options))

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dc(logits, target) - 1


class DBCE_and_DC_loss(_LabelMapCompound):  # noqa: N801 - named after nnU-Net's DC_and_CE_loss
    """``weight_ce * DBCE - weight_dice * Dice``: DC_and_CE_loss with DBCE (arXiv 2412.06045) in place of CE.

    Args:
        soft_dice_kwargs: nnU-Net's soft Dice options, as in DC_and_CE_loss (the Dice runs fused).
        dbce_kwargs: ``torch_medloss.DBCELoss``'s ``radius``, ``element``, ``spacing``, ``batch``; with ``spacing``
            (the voxel size in mm) the radius is in mm.
        weight_ce: the weight of DBCE. weight_dice: the weight of Dice (0: DBCE alone).
        ignore_label: voxels with this label count in neither term (DBCE's ``ignore_index``).
    """

    _DBCE_KEYS = ("radius", "element", "spacing", "batch")

    def __init__(self, soft_dice_kwargs: dict, dbce_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 ignore_label: int | None = None) -> None:
        super().__init__(soft_dice_kwargs, {}, weight_ce, weight_dice, ignore_label)
        dbce_kwargs = _check_kwargs("dbce_kwargs", dbce_kwargs)
        unknown = sorted(set(dbce_kwargs) - set(self._DBCE_KEYS))
        if unknown:
            raise TypeError(f"dbce_kwargs has unexpected keys {unknown}; it takes {', '.join(self._DBCE_KEYS)}.")
        if self.dice_options["clip_tp"] is not None:
            raise ValueError("soft_dice_kwargs['clip_tp'] is not supported here.")
        self.dc = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, ignore_index=ignore_label,
                                         **_dice_module_options(self.dice_options))
        # -100 never occurs in nnU-Net's label maps (labels are >= 0): "no ignore label".
        self.dbce = torch_medloss.DBCELoss(ignore_index=-100 if ignore_label is None else ignore_label,
                                           **dbce_kwargs)

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dc(logits, target) - 1

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return self.dbce(logits, target)


# ---------------------------------------------------------------------------------------------------------------------
# Sigmoid losses on regions (B, R, *S), the ignore mask (when used) in the target's last channel.

class _RegionCompound(nn.Module):
    """weight_ce * BCE + weight_dice * (sigmoid Dice-like loss - 1), as nnU-Net's DC_and_BCE_loss."""

    def __init__(self, bce_kwargs, soft_dice_kwargs, weight_ce, weight_dice, use_ignore_label) -> None:
        super().__init__()
        self.weight_ce = _check_weight("weight_ce", weight_ce)
        self.weight_dice = _check_weight("weight_dice", weight_dice)
        if not isinstance(use_ignore_label, bool):
            raise TypeError(f"use_ignore_label must be a bool, got {type(use_ignore_label).__name__}.")
        self.use_ignore_label = use_ignore_label
        self.dice_options = _soft_dice_options(soft_dice_kwargs)
        self.bce_kwargs = _check_kwargs("bce_kwargs", bce_kwargs)
        self.ce = nn.BCEWithLogitsLoss(**self.bce_kwargs)

    def _dice(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(target, torch.Tensor) or not isinstance(net_output, torch.Tensor):
            raise TypeError("net_output and target must be tensors.")
        regions_expected = net_output.shape[1] + self.use_ignore_label
        if target.ndim != net_output.ndim or target.shape[1] != regions_expected:
            raise ValueError(f"target must be (B, {regions_expected}, *S) region masks for net_output "
                             f"{tuple(net_output.shape)}{' plus the ignore channel' if self.use_ignore_label else ''}"
                             f", got {tuple(target.shape)}.")
        if not self.use_ignore_label:
            dice = self._dice(net_output, target) if self.weight_dice != 0 else 0
            return self.weight_ce * self.ce(net_output, target.float()) + self.weight_dice * dice
        # nnU-Net's mask: valid where the ignore channel is False (bool) or where 1 - it is nonzero (numbers).
        valid = ~target[:, -1:] if target.dtype == torch.bool else (1 - target[:, -1:]).bool()
        logits = net_output.masked_fill(~valid, _MASKED_LOGIT)
        regions = target[:, :-1].masked_fill(~valid, 0)
        dice = self._dice(logits, regions) if self.weight_dice != 0 else 0
        total = torch_f.binary_cross_entropy_with_logits(logits, regions.float(), weight=self.ce.weight,
                                                         pos_weight=self.ce.pos_weight, reduction="sum")
        # nnU-Net divides by the number of valid voxels (not voxels x regions), clipped at 1e-8.
        ce = total / valid.sum().clamp_min(1e-8)
        return self.weight_ce * ce + self.weight_dice * dice


class DC_and_BCE_loss(_RegionCompound):  # noqa: N801 - nnU-Net's name
    """nnU-Net's region-based loss, ``weight_ce * BCE - weight_dice * Dice`` (sigmoid), Dice on fused kernels.

    Args (nnU-Net's): bce_kwargs (torch BCEWithLogitsLoss's), soft_dice_kwargs (as DC_and_CE_loss), weight_ce,
    weight_dice, use_ignore_label (the target's last channel marks ignored voxels), dice_class (as DC_and_CE_loss).
    Targets: (B, R, *S) masks, bool or numbers (plus the ignore channel).
    """

    def __init__(self, bce_kwargs: dict, soft_dice_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 use_ignore_label: bool = False, dice_class: type | None = None) -> None:
        super().__init__(bce_kwargs, soft_dice_kwargs, weight_ce, weight_dice, use_ignore_label)
        if _dice_runs_fused(dice_class, self.dice_options):
            self.dc = torch_medloss.DiceLoss(sigmoid=True, **_dice_module_options(self.dice_options))
            self._fused_dc = True
        else:
            self.dc = _nnunet_dice_module(dice_class, torch.sigmoid, self.dice_options)
            self._fused_dc = False

    def _dice(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        # Masked voxels already carry sigmoid 0 and target 0, so no loss_mask is needed on either path.
        return self.dc(logits, regions) - 1 if self._fused_dc else self.dc(logits, regions)


class PMDice_and_BCE_loss(_RegionCompound):  # noqa: N801 - named after nnU-Net's DC_and_BCE_loss
    """``weight_ce * BCE - weight_dice * PM Dice`` (sigmoid): DC_and_BCE_loss with the Pixel-wise Modulated Dice."""

    def __init__(self, bce_kwargs: dict, soft_dice_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 use_ignore_label: bool = False, gamma: float = 2.0, squared_pred: bool = True) -> None:
        super().__init__(bce_kwargs, soft_dice_kwargs, weight_ce, weight_dice, use_ignore_label)
        if self.dice_options["clip_tp"] is not None:
            raise ValueError("soft_dice_kwargs['clip_tp'] is not supported by PM Dice.")
        self.dc = torch_medloss.PMDiceLoss(gamma=gamma, squared_pred=squared_pred, sigmoid=True,
                                           **_dice_module_options(self.dice_options))

    def _dice(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return self.dc(logits, regions) - 1


# ---------------------------------------------------------------------------------------------------------------------

class DeepSupervisionLosses(nn.Module):
    """nnU-Net's DeepSupervisionWrapper with one loss per output: ``sum_i w_i * losses[i](outputs[i], targets[i])``
    over the nonzero weights. For losses that depend on the output's resolution (DBCE's radius in mm)."""

    def __init__(self, losses: Sequence[nn.Module], weight_factors: Sequence[float]) -> None:
        super().__init__()
        if len(losses) != len(weight_factors):
            raise ValueError(f"losses and weight_factors must have the same length, got {len(losses)} and "
                             f"{len(weight_factors)}.")
        if not any(w != 0 for w in weight_factors):
            raise ValueError("weight_factors must have at least one nonzero weight.")
        self.losses = nn.ModuleList(losses)
        self.weight_factors = tuple(float(w) for w in weight_factors)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(outputs, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise TypeError("outputs and targets must be lists or tuples (one entry per deep-supervision output).")
        if len(outputs) != len(self.losses) or len(targets) != len(self.losses):
            raise ValueError(f"expected {len(self.losses)} outputs and targets, got {len(outputs)} and "
                             f"{len(targets)}.")
        terms = [w * loss(o, t) for w, loss, o, t in zip(self.weight_factors, self.losses, outputs, targets,
                                                           strict=True) if w != 0]
        return functools.reduce(lambda a, b: a + b, terms)
