"""PSNR and SSIM of denoised images (data range 1), computed on outputs clipped to [0, 1].

SSIM is scikit-image's ``structural_similarity`` with its defaults: a 7x7 uniform window, not the 11x11 Gaussian
window (sigma 1.5) of Wang et al. that most denoising papers report, so the values are not directly comparable with
published SSIMs (the tables say so). Images must be at least 7x7.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from torch_medloss.denoise.data import TestImage


def psnr(clean: np.ndarray, estimate: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / MSE) in dB, in float64; inf when the images are equal."""
    mse = float(np.mean((np.asarray(clean, np.float64) - np.asarray(estimate, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(clean: np.ndarray, estimate: np.ndarray) -> float:
    """scikit-image's structural_similarity (7x7 uniform window, its defaults) with data_range=1."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(clean, np.float64), np.asarray(estimate, np.float64),
                                       data_range=1.0))


def score(clean: Tensor, estimate: Tensor) -> dict[str, float]:
    """{"psnr", "ssim"} of estimate (clipped to [0, 1]) against clean; both (1, 1, H, W) or (H, W)."""
    a = clean.detach().float().cpu().squeeze().numpy()
    b = estimate.detach().float().cpu().clamp(0.0, 1.0).squeeze().numpy()
    return {"psnr": psnr(a, b), "ssim": ssim(a, b)}


@torch.no_grad()
def evaluate(model: nn.Module | None, images: list[TestImage], device: torch.device) -> dict[str, dict[str, float]]:
    """Per image name: the scores of model(noisy), or of the noisy input itself when model is None."""
    if model is not None:
        model.eval()
    results = {}
    for image in images:
        estimate = image.noisy if model is None else model(image.noisy.to(device))
        results[image.name] = score(image.clean, estimate)
    return results
