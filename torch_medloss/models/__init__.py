"""Models built on torch_medloss's ops: the denoisers (DnCNN, Lattice Fusion Network, the twin frequency denoiser)
and the small U-Net of the segmentation study. Imported on first access, so ``import torch_medloss.models`` is cheap.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "DnCNN": "torch_medloss.models.dncnn",
    "LatticeFusionNet": "torch_medloss.models.lattice_fusion",
    "DualFrequencyDenoiser": "torch_medloss.models.dual_frequency",
    "UNet": "torch_medloss.models.unet",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'torch_medloss.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
