"""One setup function per implementation ("provider"). Each returns the loss module to time, or raises
``Unavailable`` with the reason it cannot run here, which the table prints in place of a time.

Baselines are imported, never rewritten: MONAI's DiceLoss and DiceCELoss, and nnU-Net v2's
MemoryEfficientSoftDiceLoss (batch Dice with background, smooth 1, its own defaults otherwise).
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
    "nnunet": "nnU-Net MemoryEfficientSoftDiceLoss",
}


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
    raise Unavailable("no MONAI equivalent")


def _softmax_classes(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 1)


def _nnunet(loss: str, device: torch.device, quick: bool) -> torch.nn.Module:
    if importlib.util.find_spec("nnunetv2") is None:
        raise Unavailable("nnunetv2 not installed")
    if loss != "dice":
        raise Unavailable("no nnU-Net equivalent")
    try:
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    except ImportError as exc:
        raise Unavailable(f"nnunetv2 import failed: {exc}") from None
    return MemoryEfficientSoftDiceLoss(apply_nonlin=_softmax_classes, batch_dice=True, do_bg=True, smooth=1.0,
                                       ddp=False)


_SETUP = {
    "triton": _fused("triton"),
    "cuda": _fused("cuda"),
    "cpp": _fused("cpp"),
    "eager": _eager,
    "compiled": _compiled,
    "monai": _monai,
    "nnunet": _nnunet,
}
