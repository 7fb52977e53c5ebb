"""Two-process gloo check of batch Dice under DDP against nnunetv2's own losses (run by test_nnunet.py; not
collected by pytest).

Each rank takes its half of a fixed batch and evaluates nnU-Net's DC_and_CE_loss / DC_and_BCE_loss (ddp=True,
batch_dice=True: Dice sums all-gathered with gradient, CE the rank's own) and ours on the same logits, and writes
both values and both logit gradients. Usage: python nnunet_ddp_worker.py OUT_DIR
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
CASES = ("labels", "labels_ignore", "regions_ignore")


def make_batch(case: str, rank: int):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2 * WORLD, 3, 6, 5, 4, generator=generator) * 3
    labels = torch.randint(0, 3, (2 * WORLD, 1, 6, 5, 4), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.3
    if case == "labels_ignore":
        labels = torch.where(ignored, 3, labels)
    if case == "regions_ignore":
        target = torch.cat([labels >= 1, labels == 2, labels == 0, ignored], 1)
    else:
        target = labels.to(torch.int16)
    rows = slice(2 * rank, 2 * rank + 2)
    return logits[rows], target[rows]


def make_losses(case: str):
    from nnunetv2.training.loss import compound_losses as theirs
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from torch_medloss.nnunet import losses as ours

    dice = {"batch_dice": True, "smooth": 1e-5, "ddp": True}
    if case.startswith("regions"):
        args = ({}, {**dice, "do_bg": True})
        kwargs = {"use_ignore_label": True, "dice_class": MemoryEfficientSoftDiceLoss}
        return theirs.DC_and_BCE_loss(*args, **kwargs), ours.DC_and_BCE_loss(*args, **kwargs)
    args = ({**dice, "do_bg": False}, {})
    kwargs = {"ignore_label": 3 if case == "labels_ignore" else None, "dice_class": MemoryEfficientSoftDiceLoss}
    return theirs.DC_and_CE_loss(*args, **kwargs), ours.DC_and_CE_loss(*args, **kwargs)


def run_rank(rank: int, out_dir: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for case in CASES:
        logits, target = make_batch(case, rank)
        for name, loss in zip(("theirs", "ours"), make_losses(case), strict=True):
            x = logits.clone().requires_grad_(True)
            value = loss(x, target)
            value.backward()
            results[(case, name)] = (value.detach(), x.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(run_rank, args=(out, os.path.join(out, "init")), nprocs=WORLD, join=True)
