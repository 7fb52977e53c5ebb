"""What the benchmark runs: workloads (shape and dtype), the losses, and the parsing of the selection flags.

GPU defaults are the workloads of shared/BASELINES.md, so the figures compare with the measured baselines there. The CPU
default is one scaled-down 3D workload, to keep a full run on a 2-core CI box within about two minutes, cold compiles
included; ``--quick`` runs one smaller workload without the compiled reference.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import torch_medloss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Workload:
    """Logits of ``shape`` (B, C, *S) in ``dtype``; labels (B, 1, *S) int64, uniformly random in [0, C)."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def label(self) -> str:
        """E.g. "3D fp32 B2 C4 128^3" (the naming of BASELINES.md)."""
        batch, classes, *spatial = self.shape
        sizes = f"{spatial[0]}^{len(spatial)}" if len(set(spatial)) == 1 else "x".join(map(str, spatial))
        return f"{len(spatial)}D {SHORT_DTYPE[self.dtype]} B{batch} C{classes} {sizes}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def floor_bytes(self) -> int:
        """Bytes a fused forward+backward must move (BASELINES.md): logits read twice, gradient written once,
        int64 labels read twice."""
        voxels = self.shape[0] * _prod(self.shape[2:])
        logit_bytes = _prod(self.shape) * self.torch_dtype.itemsize
        return 2 * logit_bytes + logit_bytes + 2 * voxels * torch.int64.itemsize

    def make_inputs(self, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random logits (x3 scale, requires grad) and labels, from a private generator (global RNG untouched)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        batch, classes, *spatial = self.shape
        logits = torch.randn(self.shape, generator=generator).mul_(3)
        labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
        logits = logits.to(device=device, dtype=self.torch_dtype).requires_grad_(True)
        return logits, labels.to(device)


def _prod(values: Sequence[int]) -> int:
    out = 1
    for value in values:
        out *= value
    return out


GPU_DEFAULT = (
    Workload((2, 4, 128, 128, 128), "float32"),
    Workload((2, 4, 128, 128, 128), "bfloat16"),
    Workload((16, 4, 512, 512), "float32"),
    Workload((2, 14, 96, 96, 96), "float32"),
)
# One workload on a CPU: every loss's compiled reference costs 5-10 s of inductor compile on 2 cores (about 70 s in
# all, cold), so a second default workload would double that; ``--shape 8,4,256,256`` adds the 2D one.
CPU_DEFAULT = (Workload((2, 4, 48, 48, 48)),)
GPU_QUICK = (Workload((2, 4, 128, 128, 128)),)
CPU_QUICK = (Workload((2, 4, 32, 32, 32)),)


def default_workloads(device: torch.device, quick: bool = False) -> tuple[Workload, ...]:
    if device.type == "cuda":
        return GPU_QUICK if quick else GPU_DEFAULT
    return CPU_QUICK if quick else CPU_DEFAULT


def select_workloads(device: torch.device, quick: bool = False, shapes: Sequence[tuple[int, ...]] | None = None,
                     dtypes: Sequence[str] | None = None) -> list[Workload]:
    """The workloads to run.

    No ``shapes`` and no ``dtypes``: the defaults for the device. ``shapes`` only: each in float32. ``dtypes`` only:
    each default shape in each dtype. Both: every shape in every dtype. Duplicates are dropped, order kept.
    """
    defaults = default_workloads(device, quick)
    if not shapes and not dtypes:
        return list(defaults)
    shapes = list(shapes) if shapes else [w.shape for w in defaults]
    dtypes = list(dtypes) if dtypes else ["float32"]
    out: list[Workload] = []
    for shape in shapes:
        for dtype in dtypes:
            workload = Workload(tuple(shape), dtype)
            if workload not in out:
                out.append(workload)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Losses: the options match BASELINES.md (batch Dice, softmax over classes, gamma = 2) and MONAI's defaults otherwise.

@dataclass(frozen=True)
class LossSpec:
    key: str
    label: str
    make: Callable[[str], torch.nn.Module]  # backend name -> loss module


LOSSES = {
    spec.key: spec
    for spec in (
        LossSpec("dice", "Dice", lambda backend: torch_medloss.DiceLoss(
            to_onehot_y=True, softmax=True, batch=True, backend=backend)),
        LossSpec("pm_dice", "PM Dice (gamma 2)", lambda backend: torch_medloss.PMDiceLoss(
            gamma=2.0, to_onehot_y=True, softmax=True, batch=True, backend=backend)),
        LossSpec("dice_ce", "Dice+CE", lambda backend: torch_medloss.DiceCELoss(
            to_onehot_y=True, softmax=True, batch=True, backend=backend)),
        LossSpec("focal", "Focal (softmax)", lambda backend: torch_medloss.FocalLoss(
            to_onehot_y=True, use_softmax=True, backend=backend)),
        LossSpec("dice_focal", "Dice+Focal", lambda backend: torch_medloss.DiceFocalLoss(
            to_onehot_y=True, softmax=True, batch=True, backend=backend)),
        LossSpec("dbce", "DBCE (R=3, ball)", lambda backend: torch_medloss.DBCELoss(
            radius=3.0, element="ball", backend=backend)),
        LossSpec("balanced_ce", "Balanced CE", lambda backend: torch_medloss.BalancedCELoss(backend=backend)),
    )
}


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOSS_NAMES = {**{_normalize(s.key): s.key for s in LOSSES.values()},
               **{_normalize(s.label): s.key for s in LOSSES.values()},
               "pmdice": "pm_dice", "dbce": "dbce"}

# Implementations ("providers"); "fused" stands for the fused backends of the device (triton and cuda on a GPU, cpp
# on a CPU).
FUSED = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
PROVIDERS = ("triton", "cuda", "cpp", "eager", "compiled", "monai", "nnunet", "nnunet_compiled")
_PROVIDER_ALIASES = {"reference": "eager", "compile": "compiled", "nnunetv2": "nnunet"}


def default_providers(device: torch.device) -> list[str]:
    # nnU-Net compiles its loss on a GPU only, so its compiled column is a default there only.
    nnunet_compiled = ["nnunet_compiled"] if device.type == "cuda" else []
    return [*FUSED.get(device.type, ()), "eager", "compiled", "monai", "nnunet", *nnunet_compiled]


# ---------------------------------------------------------------------------------------------------------------------
# Flag parsing: each raises argparse.ArgumentTypeError with the value and what is accepted, so argparse exits with a
# usage line and that message.

def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_shape(value: str) -> tuple[int, ...]:
    """"2,4,48,48,48" -> (2, 4, 48, 48, 48): B, C and 2 or 3 spatial sizes, all positive, C >= 2."""
    expected = "B,C,*S with 2 or 3 spatial sizes, positive integers and C >= 2 (e.g. 2,4,48,48,48 or 8,4,256,256)"
    try:
        shape = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be {expected}, got {value!r}") from None
    if len(shape) not in (4, 5) or min(shape) < 1 or shape[1] < 2:
        raise argparse.ArgumentTypeError(f"--shape must be {expected}, got {value!r}")
    return shape


def parse_dtypes(value: str) -> list[str]:
    """"float32,bf16" -> ["float32", "bfloat16"]."""
    out = []
    for part in _split(value) or [value]:
        name = _DTYPE_ALIASES.get(part.lower(), part.lower())
        if name not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"--dtype must be a comma-separated list of {', '.join(DTYPES)} (or fp32, bf16, fp16), got {part!r}")
        out.append(name)
    return out


def parse_losses(value: str) -> list[str]:
    """"Dice,DBCE" or "dice,pm_dice" -> loss keys; case, spaces and punctuation are ignored."""
    out = []
    for part in _split(value) or [value]:
        key = _LOSS_NAMES.get(_normalize(part))
        if key is None:
            raise argparse.ArgumentTypeError(
                f"--losses must be a comma-separated list of {', '.join(LOSSES)}, got {part!r}")
        if key not in out:
            out.append(key)
    return out


def parse_providers(value: str) -> list[str]:
    """"fused,eager,monai" -> provider keys ("fused" is kept and expanded per device by ``expand_providers``)."""
    out = []
    for part in _split(value) or [value]:
        name = _PROVIDER_ALIASES.get(part.lower(), part.lower())
        if name not in (*PROVIDERS, "fused"):
            raise argparse.ArgumentTypeError(
                f"--providers must be a comma-separated list of fused, {', '.join(PROVIDERS)}, got {part!r}")
        if name not in out:
            out.append(name)
    return out


def expand_providers(names: Sequence[str] | None, device: torch.device) -> list[str]:
    if not names:
        return default_providers(device)
    out: list[str] = []
    for name in names:
        for key in FUSED.get(device.type, ()) if name == "fused" else (name,):
            if key not in out:
                out.append(key)
    return out
