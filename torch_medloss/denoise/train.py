"""Training of the denoisers: the same patches, steps, optimizer and seed for every model.

Optimizer: Adam (betas 0.9, 0.999) on the MSE between ``model(noisy)`` and the clean patch (for the residual models
that is DnCNN's loss on the predicted noise). Learning rate: cosine decay from ``lr`` (1e-3) at step 0 to
``lr_min`` (1e-5) at the last step t = steps - 1 (exactly), ``lr_t = lr_min + (lr - lr_min) (1 + cos(pi t /
(steps - 1))) / 2`` for t = 0 .. steps - 1 (a single step uses ``lr``): no tuning per model, a high rate early for
a short run and a small one at the end so the last weights are not mid-jump.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from torch_medloss.denoise.data import PatchSampler

MODELS = ("lfn", "dncnn", "dual")
CLASS_NAMES = {"lfn": "LatticeFusionNet", "dncnn": "DnCNN", "dual": "DualFrequencyDenoiser"}


def build_model(name: str, kwargs: dict | None = None) -> nn.Module:
    """The model called name ("lfn", "dncnn", "dual") with its defaults, or with kwargs."""
    from torch_medloss import models

    if name not in CLASS_NAMES:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}.")
    return getattr(models, CLASS_NAMES[name])(**(kwargs or {}))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    patch: int
    seed: int
    lr: float = 1e-3
    lr_min: float = 1e-5


def learning_rate(config: TrainConfig, step: int) -> float:
    """The cosine schedule of the module docstring (step 0 -> lr, step steps - 1 -> lr_min)."""
    fraction = step / max(config.steps - 1, 1)
    return config.lr_min + (config.lr - config.lr_min) * 0.5 * (1.0 + math.cos(math.pi * fraction))


class Progress:
    """tqdm when installed, else a plain line on stderr every 10%."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled, self.count = total, label, enabled, 0
        self.bar = None
        self.start = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)

    def update(self, loss: float) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.2e}")
        elif self.count == self.total or self.count % max(self.total // 10, 1) == 0:
            elapsed = time.perf_counter() - self.start
            print(f"{self.label}: step {self.count}/{self.total}, loss {loss:.3e}, {elapsed:.1f} s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_model(model: nn.Module, sampler: PatchSampler, config: TrainConfig, device: torch.device,
                label: str = "train", progress: bool = True) -> dict:
    """Train model in place; returns {"seconds", "losses" (one per step), "steps"}."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    bar = Progress(config.steps, label, progress)
    losses = []
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        noisy, clean = sampler.batch()
        noisy, clean = noisy.to(device, non_blocking=True), clean.to(device, non_blocking=True)
        loss = nn.functional.mse_loss(model(noisy), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(losses[-1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    return {"seconds": time.perf_counter() - start, "losses": losses, "steps": config.steps}
