"""Two-process gloo check of distributed batch Dice (run by test_distributed.py, not collected by pytest).

Each rank takes half of a fixed batch, runs a tiny model under DistributedDataParallel and a batch=True loss, and
writes its loss and parameter gradients; the single-process run on the whole batch is the expected result. Every
case (loss, backend) runs in the same two processes, one after the other: starting the ranks costs seconds, a case
milliseconds.
Usage: python ddp_worker.py OUT_DIR LOSS:BACKEND [LOSS:BACKEND ...]; writes OUT_DIR/LOSS-BACKEND-{single,rank0,rank1}.pt
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_medloss

WORLD = 2
OPTIONS = {"to_onehot_y": True, "softmax": True, "batch": True}


def make_loss(name: str, backend: str):
    if name == "dbce":
        return torch_medloss.DBCELoss(radius=1.5, batch=True, backend=backend)
    if name == "balanced_ce":
        return torch_medloss.BalancedCELoss(batch=True, backend=backend)
    cls = {"dice": torch_medloss.DiceLoss, "pm_dice": torch_medloss.PMDiceLoss,
           "generalized_dice": torch_medloss.GeneralizedDiceLoss, "tversky": torch_medloss.TverskyLoss,
           "dice_ce": torch_medloss.DiceCELoss, "dice_focal": torch_medloss.DiceFocalLoss}[name]
    return cls(backend=backend, **OPTIONS)


def make_data():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 2, 6, 5, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (4, 1, 6, 5), generator=generator)
    return images, labels


def make_model():
    torch.manual_seed(1)
    return torch.nn.Conv2d(2, 3, 3, padding=1).double()


def run(name: str, backend: str, images: torch.Tensor, labels: torch.Tensor, model: torch.nn.Module, path: str) -> None:
    loss = make_loss(name, backend)(model(images), labels)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]}, path)


def run_rank(rank: int, cases: list[tuple[str, str]], out_dir: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    images, labels = make_data()
    half = images.shape[0] // WORLD
    mine = slice(rank * half, (rank + 1) * half)
    for name, backend in cases:
        # A fresh DDP model per case: each case starts from the same parameters and no gradient.
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        run(name, backend, images[mine], labels[mine], model, f"{out_dir}/{name}-{backend}-rank{rank}.pt")
    dist.barrier()  # both ranks have written their results
    # Leave without running gloo's C++ teardown: destroying the group aborts now and then ("terminate called
    # without an active exception") after all the work is done, which would fail the test for nothing.
    os._exit(0)


def main() -> None:
    out_dir = sys.argv[1]
    cases = [tuple(case.split(":")) for case in sys.argv[2:]]
    images, labels = make_data()
    for name, backend in cases:
        run(name, backend, images, labels, make_model(), f"{out_dir}/{name}-{backend}-single.pt")
    init_file = os.path.join(out_dir, "init")
    mp.spawn(run_rank, args=(cases, out_dir, init_file), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
