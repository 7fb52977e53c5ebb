"""All-reduce of batch Dice sums across a torch.distributed process group, with autograd (as nnU-Net does for DDP).

With ``batch=True`` the Dice-family losses sum I, P, G over the batch before the ratio. Under DDP each rank holds
part of the batch, so the per-class sums are summed over ranks and every rank computes the same global loss. The
all-reduce's backward sums the gradient over ranks too (each rank's loss depends on every rank's sums), which makes
DDP's averaged parameter gradient the gradient of the global-batch loss.
"""

from __future__ import annotations

import torch

DISTRIBUTED_MODES = ("auto", "off")


def check_distributed(distributed: object) -> str:
    if not isinstance(distributed, str):
        raise TypeError(f"distributed must be a str, one of {DISTRIBUTED_MODES}, got {type(distributed).__name__}.")
    if distributed not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}.")
    return distributed


def active(distributed: str, batch: bool) -> bool:
    """Whether batch sums are all-reduced: ``batch=True``, mode "auto" and an initialized group of 2+ ranks."""
    if not batch or distributed != "auto" or not torch.distributed.is_available():
        return False
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too (every rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the default group, differentiable."""
    return _AllReduceSum.apply(tensor)
