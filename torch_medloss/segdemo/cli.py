"""Arguments and entry point of ``python -m torch_medloss segdemo`` (see torch_medloss.segdemo).

The study: for each loss and each seed, train the same small U-Net (torch_medloss.models.UNet) with the same
batches and schedule on the MNI152 template's tissue classes plus synthetic white-matter lesions
(torch_medloss.segdemo.data), predict the fixed test set (a disjoint slab of axial slices), and report Dice per
class, lesion-wise F1 and HD95 (torch_medloss.segdemo.metrics) as mean ± std over seeds: a markdown table on
stdout and in ``OUT/segdemo.md``, every number in ``OUT/segdemo.json``, and ``OUT/segdemo.png`` (one test slice,
the ground truth and each loss's prediction for the first seed). Heavy imports happen in :func:`run`.
"""

from __future__ import annotations

import argparse
import math

from torch_medloss._cli import integer, positive

DESCRIPTION = (
    "Compare the losses (CE, balanced CE, DBCE R=2 and 4, Dice, Dice+CE, focal, PM Dice gamma 1 and 2) on a small "
    "U-Net trained on MNI152 brain tissue (nilearn's template; background, CSF, grey and white matter) with "
    "synthetic white-matter lesions: Dice per class, lesion-wise F1 and HD95, mean ± std over seeds."
)

# --quick: every loss, one seed, short training (under 4 minutes on a busy 2-core CPU).
QUICK = {"steps": 30, "seeds": 1, "batch_size": 4, "patch": 48}
DEFAULT = {"steps": 1000, "seeds": 3, "batch_size": 8, "patch": 64}
MIN_PATCH = 9


def _patch(text: str) -> int:
    # The U-Net (depth 3) needs more than one voxel at its bottleneck: some axis longer than 2**3.
    return integer(text, MIN_PATCH, f"an integer >= {MIN_PATCH} (the U-Net's 3 down-samplings need more than 8 voxels)")


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _device(text: str):
    """The torch.device of --device ("auto": cuda when available), or an error message (str) for the CLI."""
    import torch

    expected = "expected auto, cpu, cuda or cuda:N"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"segdemo: --device: {expected}, got {text!r}"
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        return f"segdemo: --device: {expected}, got {text!r}"
    if not torch.cuda.is_available():
        return f"segdemo: --device {text}, but torch sees no CUDA device"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"segdemo: --device {text}, but torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return device


def _losses(text: str) -> list[str]:
    from torch_medloss.segdemo.train import parse_losses

    try:
        return parse_losses(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: every loss, {QUICK['seeds']} seed, {QUICK['steps']} steps of "
                        f"{QUICK['batch_size']} {QUICK['patch']}^2 crops (a smoke test, not a result)")
    parser.add_argument("--steps", type=positive,
                        help=f"optimiser steps per run (default {DEFAULT['steps']}, {QUICK['steps']} with --quick)")
    parser.add_argument("--batch-size", type=positive,
                        help="images per step (default 8 in 2D, 4 with --quick, 2 in 3D)")
    parser.add_argument("--patch", type=_patch,
                        help=f"training crop size, >= {MIN_PATCH} (default 64 in 2D, 48 with --quick, 24 in 3D)")
    parser.add_argument("--losses", type=_losses, metavar="LOSSES",
                        help="comma-separated subset of ce, bce, dbce2, dbce4, dice, dicece, focal, pmdice1, "
                        "pmdice2 (default: all)")
    parser.add_argument("--seeds", type=positive,
                        help=f"number of seeds 0..N-1 (default {DEFAULT['seeds']}, {QUICK['seeds']} with --quick)")
    parser.add_argument("--dim", type=int, choices=[2, 3], default=2, help="2 (axial slices, default) or 3 (patches)")
    parser.add_argument("--resolution", type=int, choices=[1, 2], default=2, help="template resolution in mm")
    parser.add_argument("--lr", type=_learning_rate, default=3e-3, help="Adam learning rate, > 0 (default 3e-3)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=positive,
                        help="CPU threads for torch (default: torch's own choice); 1 is much faster on a CPU that "
                        "other processes share")
    parser.add_argument("--out", default="segdemo_out", help="output folder (default segdemo_out/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    import datetime
    import platform
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from torch_medloss.segdemo import data, metrics, report, train

    started = time.time()
    base = QUICK if args.quick else DEFAULT
    steps = args.steps or base["steps"]
    seeds = list(range(args.seeds or base["seeds"]))
    batch_size = args.batch_size or (base["batch_size"] if args.dim == 2 else 2)
    patch = args.patch or (base["patch"] if args.dim == 2 else 24)
    keys = args.losses or list(train.LOSSES)
    device = _device(args.device)
    if isinstance(device, str):
        print(device, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    try:
        brain = data.load_brain(args.resolution)
    except ImportError as err:
        print(f"segdemo needs nilearn, nibabel and scipy ({err}); pip install nilearn", file=sys.stderr)
        return 1
    test_x, test_y = data.test_set(brain, args.dim)
    spacing = brain.spacing[1:] if args.dim == 2 else brain.spacing
    print(f"segdemo: {len(keys)} losses x {len(seeds)} seeds x {steps} steps, {args.dim}D, batch {batch_size}, "
          f"patch {patch}, device {device}; train slabs {brain.train_slabs}, test slab {brain.test_slab} "
          f"(axial slices at {args.resolution} mm), {len(test_x)} test images", file=sys.stderr)

    progress = train.Progress(len(keys) * len(seeds) * steps, enabled=not args.no_progress)
    per_seed: dict[str, list[dict]] = {k: [] for k in keys}
    histories: dict[str, list[list[float]]] = {k: [] for k in keys}
    first_preds: dict[str, np.ndarray] = {}
    for seed in seeds:
        for key in keys:
            name = train.LOSSES[key][0]
            # Drawn lazily, from a generator re-created for every loss: each loss sees the same batches.
            batches = data.training_batches(brain, seed, steps, batch_size, args.dim, patch)
            model, history = train.train_one(key, batches, seed, args.dim, args.lr, device,
                                             lambda step, loss, n=f"{name} seed {seed}": progress.update(n, loss),
                                             steps=steps)
            pred = train.predict(model, test_x, device, chunk=8 if args.dim == 2 else 1)
            per_seed[key].append(metrics.evaluate(pred, test_y[:, 0], len(data.CLASSES), data.LESION, spacing))
            histories[key].append(history)
            if seed == seeds[0]:
                first_preds[key] = pred
    progress.close()

    summary = {k: report.summarize(v) for k, v in per_seed.items()}
    names = {k: train.LOSSES[k][0] for k in keys}
    table = report.markdown_table(summary, names)
    elapsed = time.time() - started
    command = "python -m torch_medloss " + " ".join(sys.argv[1:])
    settings = {"dim": args.dim, "resolution_mm": args.resolution, "steps": steps, "seeds": seeds,
                "batch_size": batch_size, "patch": patch, "lr": args.lr, "device": str(device),
                "threads": torch.get_num_threads(),
                "train_slabs": brain.train_slabs, "test_slab": brain.test_slab, "test_images": len(test_x),
                "test_lesions": per_seed[keys[0]][0]["lesion"]["true"]}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    header = (f"segdemo, {datetime.date.today().isoformat()}: {args.dim}D, {steps} steps x batch {batch_size} "
              f"(patch {patch}), seeds {seeds}, lr {args.lr}, device {device}, torch {torch.__version__}; "
              f"{settings['test_images']} test images with {settings['test_lesions']} lesions; {elapsed:.0f} s.\n"
              "Mean ± sample std over seeds. Dice and lesion counts pooled over the test set; HD95 in mm, mean over "
              "the test images where the class is in the prediction or the target (- where in none; one-sided "
              "empty = image diagonal).\n")
    (out / "segdemo.md").write_text(header + "\n" + table + "\n")
    report.write_json(out / "segdemo.json", {
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": settings,
        "machine": machine, "seconds": elapsed, "classes": list(data.CLASSES), "losses": names,
        "summary": summary, "per_seed": per_seed,
        "loss_history": {k: [[h[0], float(np.mean(h[-max(1, len(h) // 10):]))] for h in v]
                         for k, v in histories.items()},
    })
    # The figure: the test image with the most lesion voxels (its middle slice in 3D), first seed.
    i = int(np.argmax((test_y == data.LESION).reshape(len(test_y), -1).sum(1)))
    img, tgt = test_x[i, 0], test_y[i, 0]
    preds = {names[k]: v[i] for k, v in first_preds.items()}
    if args.dim == 3:
        z = int(np.argmax((tgt == data.LESION).sum(axis=(1, 2))))
        img, tgt, preds = img[z], tgt[z], {k: v[z] for k, v in preds.items()}
    drew = report.figure(out / "segdemo.png", img, tgt, preds, f"test image {i}, seed {seeds[0]}, {steps} steps")
    print(header + "\n" + table)
    print(f"\nwrote {out / 'segdemo.md'}, {out / 'segdemo.json'}"
          + (f", {out / 'segdemo.png'}" if drew else " (no figure: matplotlib not installed)"))
    return 0
