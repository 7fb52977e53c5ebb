"""Arguments and entry point of ``python -m torch_medloss denoise`` (see torch_medloss.denoise).

``train`` trains each chosen model at each sigma the same way (torch_medloss.denoise.train), saves
``<out>/<model>_sigma<sigma>.pt`` (weights, constructor arguments, the command's arguments, training time and
losses), evaluates on the held-out images and writes the table to ``<out>/train_results.md`` and ``.json``.
``eval`` loads those checkpoints and writes ``<out>/eval_results.md`` and ``.json``. Both tables have a row for the
noisy input. Exit status: 0, or 2 for a usage problem (no CUDA for --device cuda, missing checkpoints).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODELS = ("lfn", "dncnn", "dual")  # torch_medloss.denoise.train.MODELS, repeated to keep --help import-light
SIGMAS = (15.0, 25.0, 50.0, 75.0)
# (steps, batch size, patch side, test crop side) of --quick and of the full run (the latter sized for a GPU).
QUICK = (40, 8, 32, 128)
FULL = (20000, 64, 40, 0)

DESCRIPTION = (
    "Train and evaluate denoisers (DnCNN, Lattice Fusion Network, twin frequency denoiser) on scikit-image's "
    "photographs with additive Gaussian noise; print PSNR/SSIM tables on held-out images (camera, moon, coins, "
    "astronaut). --quick trains all three in a few minutes on a CPU; the full run is meant for a GPU."
)


def _models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return names


def _sigmas(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"sigma must be a number, got {part!r}") from None
        if value not in SIGMAS:
            raise argparse.ArgumentTypeError(f"sigma must be one of {', '.join(f'{s:g}' for s in SIGMAS)}, "
                                             f"got {part!r}")
        values.append(value)
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train", "eval"], help="train (then evaluate) or evaluate checkpoints")
    parser.add_argument("--model", action="append", type=_models, metavar="NAMES",
                        help="lfn, dncnn, dual; repeat or comma-separate (default: all three)")
    parser.add_argument("--sigma", action="append", type=_sigmas, metavar="SIGMA",
                        help="noise standard deviation on [0, 255]: 15, 25, 50 or 75; repeat or comma-separate "
                        "(default 25)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run: {QUICK[0]} steps, batch {QUICK[1]}, {QUICK[2]}px patches, "
                        f"{QUICK[3]}px centre crops of the test images")
    parser.add_argument("--steps", type=_positive, help=f"training steps (default {FULL[0]}; --quick {QUICK[0]})")
    parser.add_argument("--batch-size", type=_positive,
                        help=f"patches per step (default {FULL[1]}; --quick {QUICK[1]})")
    parser.add_argument("--patch", type=_positive, help=f"patch side in pixels (default {FULL[2]}; --quick {QUICK[2]})")
    parser.add_argument("--eval-crop", type=_nonnegative, metavar="N",
                        help="evaluate on centred N x N crops of the test images, 0 for whole images "
                        f"(default 0; --quick {QUICK[3]})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto (default): cuda when available")
    parser.add_argument("--out", default="denoise_out", metavar="DIR",
                        help="checkpoints and tables go here (default ./denoise_out)")
    parser.add_argument("--seed", type=_nonnegative, default=0,
                        help="seed (>= 0) of the weights, patches and noise (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _settings(args: argparse.Namespace) -> dict:
    defaults = QUICK if args.quick else FULL
    chosen = (args.steps, args.batch_size, args.patch, args.eval_crop)
    steps, batch, patch, crop = (d if c is None else c for c, d in zip(chosen, defaults, strict=True))
    models = [] if args.model is None else list(dict.fromkeys(n for group in args.model for n in group))
    sigmas = [25.0] if args.sigma is None else list(dict.fromkeys(s for group in args.sigma for s in group))
    return {"steps": steps, "batch_size": batch, "patch": patch, "eval_crop": crop or None,
            "models": models, "sigmas": sigmas}


def checkpoint_path(out: Path, model: str, sigma: float) -> Path:
    return out / f"{model}_sigma{sigma:g}.pt"


def run(args: argparse.Namespace) -> int:
    """Train or evaluate; print the table; return the exit status."""
    import torch

    from torch_medloss.denoise import data, metrics, report, train

    if args.device == "cuda" and not torch.cuda.is_available():
        print("denoise: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    settings = _settings(args)
    out = Path(args.out)
    recorded_args = {k: v for k, v in vars(args).items() if k != "run"} | {"resolved": settings}

    if args.action == "train":
        models = settings["models"] or list(MODELS)
        if "dual" in models:
            from torch_medloss.models.dual_frequency import DualFrequencyDenoiser

            radius = DualFrequencyDenoiser().radius
            if settings["patch"] <= radius or (settings["eval_crop"] or radius + 1) <= radius:
                print(f"denoise: the dual model needs --patch and --eval-crop > its blur radius {radius}",
                      file=sys.stderr)
                return 2
        out.mkdir(parents=True, exist_ok=True)
    else:
        wanted = settings["models"] or list(MODELS)
        found = {(m, s): checkpoint_path(out, m, s) for m in wanted for s in settings["sigmas"]}
        missing = [str(p) for p in found.values() if not p.exists()]
        if settings["models"] and missing or len(missing) == len(found):
            print(f"denoise eval: missing checkpoints {', '.join(missing)}; run `denoise train` with the same --out, "
                  "--model and --sigma first", file=sys.stderr)
            return 2
        models = [m for m in wanted if all(found[m, s].exists() for s in settings["sigmas"])]

    config = train.TrainConfig(settings["steps"], settings["batch_size"], settings["patch"], args.seed)
    tables = []
    for sigma in settings["sigmas"]:
        images = data.test_set(sigma, args.seed, settings["eval_crop"])
        rows = [report.row("noisy input", metrics.evaluate(None, images, device))]
        for name in models:
            if args.action == "train":
                torch.manual_seed(args.seed)
                model = train.build_model(name)
                sampler = data.PatchSampler(sigma, config.patch, config.batch_size, args.seed)
                log = train.train_model(model, sampler, config, device, label=f"{name} sigma={sigma:g}",
                                        progress=not args.no_progress)
                record = {"model": name, "kwargs": {}, "sigma": sigma, "args": recorded_args,
                          "state_dict": model.state_dict(), "params": train.count_parameters(model),
                          "train_seconds": log["seconds"], "steps": log["steps"], "losses": log["losses"],
                          "device": str(device), "torch": str(torch.__version__)}
                torch.save(record, checkpoint_path(out, name, sigma))
            else:
                record = torch.load(checkpoint_path(out, name, sigma), map_location="cpu", weights_only=True)
                model = train.build_model(record["model"], record["kwargs"])
                model.load_state_dict(record["state_dict"])
                model.to(device)
            scores = metrics.evaluate(model, images, device)
            rows.append(report.row(name, scores, record["params"], record["train_seconds"], record["steps"]))
        tables.append({"sigma": sigma, "image_sizes": {i.name: list(i.clean.shape[-2:]) for i in images},
                       "rows": rows})
    env = report.environment(device)
    title = f"denoise {args.action}: " + ", ".join(models) + f" (seed {args.seed})"
    text = report.markdown(tables, env, title)
    print(text)
    md, js = report.write(out, f"{args.action}_results", tables, env, recorded_args, text)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0
