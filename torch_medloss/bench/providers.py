"""One setup function per implementation ("provider"). Each returns the loss module to time, or raises
``Unavailable`` with the reason it cannot run here, which the table prints in place of a time.

Baselines are imported, never rewritten: MONAI's DiceLoss and DiceCELoss, and nnU-Net v2's MemoryEfficientSoftDiceLoss
(Dice) and DC_and_CE_loss (Dice+CE), set to the benchmark's losses (batch Dice with background, softmax, smooth
1e-5): nnU-Net's Dice+CE value is ours minus 1 (it reports -Dice). "nnunet_compiled" compiles them as nnU-Net's
trainer does on a GPU (``loss.dc = torch.compile(loss.dc)``; nnU-Net does not compile on a CPU).
"""

from __future__ import annotations

import importlib.util

import torch

from torch_medloss import _backend
from torch_medloss.bench.workloads import LOSSES

LABELS = {
    "triton": "fused Triton",
    "cuda": "fused CUDA",
    "cpp": "fused C++",
    "eager": "reference eager",
    "compiled": "reference compiled",
    "monai": "MONAI",
    "nnunet": "nnU-Net eager",
    "nnunet_compiled": "nnU-Net compiled",
}

# Providers that compile: dynamo is reset after each of their cells, and a first-call failure reads "compile failed".
COMPILED = ("compiled", "nnunet_compiled")


class Unavailable(Exception):
    """This provider cannot run this loss here; ``status`` is "unavailable" or "skipped", the message says why."""

    def __init__(self, reason: str, status: str = "unavailable") -> None:
        super().__init__(reason)
        self.status = status


def build(provider: str, loss: str, device: torch.device, quick: bool = False) -> torch.nn.Module:
    """The module that computes ``loss`` with ``provider`` on ``device``; raises Unavailable with the reason."""
    return _SETUP[provider](loss, device, quick)


def _fused(backend: str):
    def setup(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
        reason = _backend.why_unavailable(backend, device)
        if reason is not None:
            raise Unavailable(reason)
        return LOSSES[loss].make(backend)

    return setup


def _eager(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
    return LOSSES[loss].make("reference")


def _compiled(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
    if quick and device.type == "cpu":
        raise Unavailable("skipped under --quick on CPU (compiling takes 3-20 s per loss); run without --quick",
                          status="skipped")
    # Every loss module shares one forward code object, so without a reset each new module is a recompile and
    # dynamo silently falls back to eager past its recompile limit.
    torch._dynamo.reset()
    return torch.compile(LOSSES[loss].make("reference"))


def _monai(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
    if importlib.util.find_spec("monai") is None:
        raise Unavailable("MONAI not installed")
    import monai.losses

    if loss == "dice":
        return monai.losses.DiceLoss(to_onehot_y=True, softmax=True, batch=True)
    if loss == "dice_ce":
        return monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    if loss == "focal":
        return monai.losses.FocalLoss(to_onehot_y=True, use_softmax=True)
    if loss == "dice_focal":
        return monai.losses.DiceFocalLoss(to_onehot_y=True, softmax=True, batch=True)
    raise Unavailable("no MONAI equivalent")


def _softmax_classes(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 1)


def _nnunet(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
    if importlib.util.find_spec("nnunetv2") is None:
        raise Unavailable("nnunetv2 not installed")
    if loss not in ("dice", "dice_ce"):
        raise Unavailable("no nnU-Net equivalent")
    try:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    except Exception as exc:  # noqa: BLE001 - a broken install (e.g. its torchvision) is a reason, not a crash
        raise Unavailable(f"nnunetv2 import failed: {exc}") from None
    dice = {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False}
    if loss == "dice":
        return MemoryEfficientSoftDiceLoss(apply_nonlin=_softmax_classes, **dice)
    return DC_and_CE_loss(dice, {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)


def _nnunet_compiled(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
    module = _nnunet(loss, device, quick)
    if quick and device.type == "cpu":
        raise Unavailable("skipped under --quick on CPU (compiling takes 3-20 s per loss); run without --quick",
                          status="skipped")
    torch._dynamo.reset()
    if loss == "dice":
        return torch.compile(module)
    module.dc = torch.compile(module.dc)  # what nnUNetTrainer._build_loss does; its CE stays eager
    return module


_SETUP = {
    "triton": _fused("triton"),
    "cuda": _fused("cuda"),
    "cpp": _fused("cpp"),
    "eager": _eager,
    "compiled": _compiled,
    "monai": _monai,
    "nnunet": _nnunet,
    "nnunet_compiled": _nnunet_compiled,
}
