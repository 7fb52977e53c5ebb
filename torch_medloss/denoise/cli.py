"""Arguments and entry point of ``python -m torch_medloss denoise`` (see torch_medloss.denoise).

``train`` trains each chosen model at each sigma the same way (torch_medloss.denoise.train), saves
``<out>/<model>_sigma<sigma>.pt`` (weights, constructor arguments, the command's arguments, training time and
losses), evaluates on the held-out images and writes the table to ``<out>/train_results.md`` and ``.json``.
``eval`` loads those checkpoints and writes ``<out>/eval_results.md`` and ``.json``; its test set (the seed of the
test noise and the eval crop) is the one the checkpoints were trained and scored with unless --seed, --eval-crop or
--quick say otherwise, and then a warning on stderr says the scores are on a different test set. Without --model,
models lacking a checkpoint for a chosen sigma are skipped, named on stderr. Both tables have a row for the noisy
input. Exit status: 0, or 2 for a usage problem (no CUDA for --device cuda, missing checkpoints, a patch or crop
size the data or a model cannot take, checkpoints trained on different test sets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch_medloss._cli import integer, positive

MODELS = ("lfn", "dncnn", "dual")  # torch_medloss.denoise.train.MODELS, repeated to keep --help import-light
SIGMAS = (15.0, 25.0, 50.0, 75.0)
# (steps, batch size, patch side, test crop side) of --quick and of the full run (the latter sized for a GPU).
QUICK = (40, 8, 32, 128)
FULL = (20000, 64, 40, 0)
SSIM_WINDOW = 7  # scikit-image's structural_similarity window side: a test image (crop) must be at least this big
SEED_MAX = 2**63 - 1

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


def _seed(text: str) -> int:
    value = integer(text, 0, f"an integer in [0, {SEED_MAX}]")
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {text!r}")
    return value


def _crop(text: str) -> int:
    expected = f"0 (whole images) or an integer >= {SSIM_WINDOW} (the SSIM window)"
    value = integer(text, 0, expected)
    if 0 < value < SSIM_WINDOW:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


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
    parser.add_argument("--steps", type=positive, help=f"training steps (default {FULL[0]}; --quick {QUICK[0]})")
    parser.add_argument("--batch-size", type=positive,
                        help=f"patches per step (default {FULL[1]}; --quick {QUICK[1]})")
    parser.add_argument("--patch", type=positive, help=f"patch side in pixels (default {FULL[2]}; --quick {QUICK[2]})")
    parser.add_argument("--eval-crop", type=_crop, metavar="N",
                        help=f"evaluate on centred N x N crops of the test images (N >= {SSIM_WINDOW}), 0 for whole "
                        f"images (default 0; --quick {QUICK[3]}; eval: the checkpoints' value)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto (default): cuda when available")
    parser.add_argument("--out", default="denoise_out", metavar="DIR",
                        help="checkpoints and tables go here (default ./denoise_out)")
    parser.add_argument("--seed", type=_seed,
                        help="seed (>= 0) of the weights, patches and test noise (default 0; eval: the checkpoints' "
                        "seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _settings(args: argparse.Namespace) -> dict:
    defaults = QUICK if args.quick else FULL
    chosen = (args.steps, args.batch_size, args.patch, args.eval_crop)
    steps, batch, patch, crop = (d if c is None else c for c, d in zip(chosen, defaults, strict=True))
    models = [] if args.model is None else list(dict.fromkeys(n for group in args.model for n in group))
    sigmas = [25.0] if args.sigma is None else list(dict.fromkeys(s for group in args.sigma for s in group))
    return {"steps": steps, "batch_size": batch, "patch": patch, "eval_crop": crop or None,
            "seed": 0 if args.seed is None else args.seed, "models": models, "sigmas": sigmas}


def checkpoint_path(out: Path, model: str, sigma: float) -> Path:
    return out / f"{model}_sigma{sigma:g}.pt"


def _recorded(record: dict) -> dict:
    """The seed and eval crop (None: whole images) a checkpoint's training run evaluated with."""
    args = record.get("args", {})
    resolved = args.get("resolved", {})
    return {"seed": resolved.get("seed", args.get("seed", 0)), "eval_crop": resolved.get("eval_crop") or None}


def _test_set_of_checkpoints(args: argparse.Namespace, settings: dict, records: dict) -> str | None:
    """eval: set settings["seed"] and settings["eval_crop"] to the checkpoints' values unless given on the command
    line (then warn on stderr when they differ); returns an error message when the checkpoints disagree."""
    given = {"seed": args.seed, "eval_crop": settings["eval_crop"] if args.eval_crop is not None or args.quick
             else None}
    explicit = {"seed": args.seed is not None, "eval_crop": args.eval_crop is not None or args.quick}
    flags = {"seed": "--seed", "eval_crop": "--eval-crop"}
    differing = []
    for key, flag in flags.items():
        values = {(m, s): _recorded(record)[key] for (m, s), record in records.items()}
        distinct = set(values.values())
        if not explicit[key]:
            if len(distinct) > 1:
                listing = ", ".join(f"{m} sigma {s:g}: {v or 0}" for (m, s), v in values.items())
                return (f"denoise eval: the checkpoints were trained with different {flag} values ({listing}); "
                        f"give {flag} (or --model/--sigma) to choose the test set")
            settings[key] = distinct.pop()
        else:
            settings[key] = given[key]
            if distinct != {given[key]}:
                recorded = ", ".join(str(v or 0) for v in sorted(distinct, key=lambda v: v or 0))
                differing.append(f"{flag} {given[key] or 0} (training used {recorded})")
    if differing:
        print(f"denoise eval: warning: {'; '.join(differing)}: the scores are on a different test set than training "
              "reported", file=sys.stderr)
    return None


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
    models = settings["models"] or list(MODELS)
    records: dict = {}

    if args.action == "train":
        smallest = data.smallest_side()
        if settings["patch"] > smallest:
            print(f"denoise: --patch must be <= {smallest} (the smallest training image side), got "
                  f"{settings['patch']}", file=sys.stderr)
            return 2
        if "dncnn" in models and settings["batch_size"] * settings["patch"] ** 2 < 2:
            print("denoise: the dncnn model (batch normalisation) needs more than one pixel per batch: --patch or "
                  "--batch-size > 1", file=sys.stderr)
            return 2
        built = [(m, {}) for m in models]
    else:
        found = {(m, s): checkpoint_path(out, m, s) for m in models for s in settings["sigmas"]}
        missing = {m: [str(p) for (n, _), p in found.items() if n == m and not p.exists()] for m in models}
        available = [m for m in models if not missing[m]]
        if settings["models"] and any(missing.values()) or not available:
            paths = [p for m in models for p in missing[m]]
            print(f"denoise eval: missing checkpoints {', '.join(paths)}; run `denoise train` with the same --out, "
                  "--model and --sigma first", file=sys.stderr)
            return 2
        for m in models:
            if missing[m]:
                print(f"denoise eval: skipping {m}: no checkpoint {', '.join(missing[m])}", file=sys.stderr)
        models = available
        records = {(m, s): torch.load(found[m, s], map_location="cpu", weights_only=True)
                   for m in models for s in settings["sigmas"]}
        error = _test_set_of_checkpoints(args, settings, records)
        if error:
            print(error, file=sys.stderr)
            return 2
        built = [(record["model"], record["kwargs"]) for record in records.values()]
    for name, kwargs in built:  # the twin frequency denoiser blurs with a finite kernel: images must be wider
        radius = getattr(train.build_model(name, kwargs), "radius", None)
        sizes = [("--eval-crop", settings["eval_crop"])] + ([("--patch", settings["patch"])]
                                                           if args.action == "train" else [])
        for flag, size in sizes:
            if radius is not None and size is not None and size <= radius:
                print(f"denoise: the {name} model needs {flag} > its blur radius {radius}, got {size}",
                      file=sys.stderr)
                return 2
    if args.action == "train":
        out.mkdir(parents=True, exist_ok=True)
    seed = settings["seed"]
    recorded_args = {k: v for k, v in vars(args).items() if k != "run"} | {"resolved": settings}

    config = train.TrainConfig(settings["steps"], settings["batch_size"], settings["patch"], seed)
    tables = []
    for sigma in settings["sigmas"]:
        images = data.test_set(sigma, seed, settings["eval_crop"])
        rows = [report.row("noisy input", metrics.evaluate(None, images, device))]
        for name in models:
            if args.action == "train":
                torch.manual_seed(seed)
                model = train.build_model(name)
                sampler = data.PatchSampler(sigma, config.patch, config.batch_size, seed)
                log = train.train_model(model, sampler, config, device, label=f"{name} sigma={sigma:g}",
                                        progress=not args.no_progress)
                record = {"model": name, "kwargs": {}, "sigma": sigma, "args": recorded_args,
                          "state_dict": model.state_dict(), "params": train.count_parameters(model),
                          "train_seconds": log["seconds"], "steps": log["steps"], "losses": log["losses"],
                          "device": str(device), "torch": str(torch.__version__)}
                torch.save(record, checkpoint_path(out, name, sigma))
            else:
                record = records[name, sigma]
                model = train.build_model(record["model"], record["kwargs"])
                model.load_state_dict(record["state_dict"])
                model.to(device)
            scores = metrics.evaluate(model, images, device)
            rows.append(report.row(name, scores, record["params"], record["train_seconds"], record["steps"]))
        tables.append({"sigma": sigma, "image_sizes": {i.name: list(i.clean.shape[-2:]) for i in images},
                       "rows": rows})
    env = report.environment(device)
    title = f"denoise {args.action}: " + ", ".join(models) + f" (seed {seed})"
    text = report.markdown(tables, env, title)
    print(text)
    md, js = report.write(out, f"{args.action}_results", tables, env, recorded_args, text)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0
