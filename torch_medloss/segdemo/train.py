"""The losses compared, and one training run: the same U-Net, optimiser, schedule and batches for every loss.

Every loss comes from torch_medloss's public API and takes the logits (B, 5, *S) and the label map (B, 1, *S):

========== ================================================================================================
key        loss
========== ================================================================================================
ce         cross entropy: ``DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0)`` (the CE part only)
bce        balanced CE: ``BalancedCELoss()`` (inverse class frequency per image)
dbce2      DBCE: ``DBCELoss(radius=2.0)`` (ball of radius 2 voxels)
dbce4      DBCE: ``DBCELoss(radius=4.0)``
dice       ``DiceLoss(to_onehot_y=True, softmax=True)`` (MONAI defaults: background included, per image)
dicece     ``DiceCELoss(to_onehot_y=True, softmax=True)`` (lambda 1 and 1)
focal      ``FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)``
pmdice1    ``PMDiceLoss(gamma=1.0, to_onehot_y=True, softmax=True)``
pmdice2    ``PMDiceLoss(gamma=2.0, to_onehot_y=True, softmax=True)``
========== ================================================================================================

Training: Adam (lr ``lr``, default 3e-3), polynomial decay lr * (1 - step / steps)^0.9 (nnU-Net's), no weight
decay; the model is initialised from ``torch.manual_seed(seed)`` and the batches come from
``np.random.default_rng(seed)`` (torch_medloss.segdemo.data.training_batches), drawn lazily during training from a
generator re-created for every loss, so that every loss sees the same batches with one batch in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sized

import numpy as np
import torch

import torch_medloss as tm

LOSSES: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "ce": ("CE", lambda: tm.DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0)),
    "bce": ("Balanced CE", lambda: tm.BalancedCELoss()),
    "dbce2": ("DBCE R=2", lambda: tm.DBCELoss(radius=2.0)),
    "dbce4": ("DBCE R=4", lambda: tm.DBCELoss(radius=4.0)),
    "dice": ("Dice", lambda: tm.DiceLoss(to_onehot_y=True, softmax=True)),
    "dicece": ("Dice+CE", lambda: tm.DiceCELoss(to_onehot_y=True, softmax=True)),
    "focal": ("Focal", lambda: tm.FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)),
    "pmdice1": ("PM Dice g=1", lambda: tm.PMDiceLoss(gamma=1.0, to_onehot_y=True, softmax=True)),
    "pmdice2": ("PM Dice g=2", lambda: tm.PMDiceLoss(gamma=2.0, to_onehot_y=True, softmax=True)),
}


def parse_losses(text: str) -> list[str]:
    """Comma-separated loss keys (see ``LOSSES``) into a list; raises ValueError naming the unknown ones."""
    keys = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in LOSSES]
    if unknown or not keys:
        raise ValueError(f"unknown loss(es) {unknown or text!r}; choose from {', '.join(LOSSES)}")
    return keys


def make_model(dim: int, num_classes: int = 5) -> torch.nn.Module:
    from torch_medloss.models import UNet

    return UNet(in_channels=1, num_classes=num_classes, spatial_dims=dim, base_channels=16, depth=3)


def train_one(loss_key: str, batches: Iterable[tuple[np.ndarray, np.ndarray]], seed: int, dim: int, lr: float,
              device: torch.device, progress: Callable[[int, float], None] | None = None,
              steps: int | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Train a fresh U-Net with one loss on the given batches (one optimiser step each); returns it and the
    per-step loss values. ``batches``: a sequence, or any iterable (a generator: drawn as training goes) with
    ``steps`` its length (the learning-rate schedule's horizon); at most ``steps`` batches are used."""
    if steps is None:
        if not isinstance(batches, Sized):
            raise TypeError("train_one: give steps when batches is an iterator (it has no len())")
        steps = len(batches)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_one: steps must be an integer >= 1, got {steps!r}")
    torch.manual_seed(seed)
    model = make_model(dim).to(device)
    loss_fn = LOSSES[loss_key][1]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / steps) ** 0.9)
    history = []
    model.train()
    for step, (x, y) in zip(range(steps), batches, strict=False):
        x = torch.from_numpy(x).to(device)
        y = torch.from_numpy(y).to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step, history[-1])
    return model, history


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, chunk: int = 8) -> np.ndarray:
    """Argmax label maps (N, *S) int64 for images (N, 1, *S)."""
    model.eval()
    out = []
    for i in range(0, len(images), chunk):
        logits = model(torch.from_numpy(images[i:i + chunk]).to(device))
        out.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(out)


class Progress:
    """A progress bar over ``total`` steps: tqdm when installed, else a line on stderr every ~10 %."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.time()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str, loss: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
            return
        every = max(1, self.total // 10)
        if self.done % every == 0 or self.done == self.total:
            import sys

            elapsed = time.time() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"segdemo: {self.done}/{self.total} steps ({100 * self.done / self.total:.0f}%), {label}, "
                  f"loss {loss:.4f}, {elapsed:.0f} s elapsed, ~{eta:.0f} s left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
