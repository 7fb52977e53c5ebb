"""Command line of torch_medloss: ``python -m torch_medloss <command>`` (or the ``torch-medloss`` script).

Commands:
    build: compile the C++/CUDA extension into the cache (see torch_medloss._extension), a line per compiled file,
        and report what was built; a library already in the wheel or the cache is loaded instead. Exits 1 when the
        CPU part could not be built; a CPU-only build on a machine without CUDA is a success.
    bench: time forward+backward of the losses per backend against the reference (eager and compiled), MONAI and
        nnU-Net, on the GPU when there is one, else the CPU; prints a markdown table (see torch_medloss.bench).
    denoise: train or evaluate the denoisers (DnCNN, Lattice Fusion Network, twin frequency denoiser) on
        scikit-image's photographs and print PSNR/SSIM tables (see torch_medloss.denoise).
    segdemo: train a small U-Net on the MNI152 template's tissue classes plus synthetic lesions with each loss and
        compare Dice, lesion F1 and HD95 (see torch_medloss.segdemo).
    nnunet: path|install|uninstall, make nnU-Net v2 find torch_medloss's trainers (see torch_medloss.nnunet).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def _build(args: argparse.Namespace) -> int:
    from torch_medloss import _extension

    report = _extension.build(verbose=args.verbose, progress=True)
    if report["path"] is None:
        print("torch_medloss extension: not built")
    else:
        where = {"wheel": "loaded from the wheel", "cache": "loaded from the cache"}.get(report["origin"],
                                                                                       "built and loaded")
        print(f"torch_medloss extension: {report['path']} ({where} in {report['seconds']:.1f} s)")
    for part in ("cpu", "cuda"):
        status = "yes" if report[part] else f"no ({report[f'{part}_reason']})"
        print(f"  {part}: {status}")
    return 0 if report["cpu"] else 1


def _bench(args: argparse.Namespace) -> int:
    from torch_medloss.bench import cli

    return cli.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torch_medloss", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="compile the C++/CUDA extension into the cache and report what was built",
        description="Compile csrc/ into the cache ($TORCH_MEDLOSS_CACHE or ~/.cache/torch_medloss), a line per "
        "compiled file, and load it; a library already in the wheel or the cache is loaded instead. A cache "
        "prepared this way on a shared file system serves every machine that sets TORCH_MEDLOSS_CACHE to it, "
        "without a compiler. Exits 1 when the CPU part could not be built.",
    )
    build.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    build.set_defaults(run=_build)

    from torch_medloss.bench import cli as bench_cli

    bench = commands.add_parser("bench", help="benchmark the losses against the reference, MONAI and nnU-Net",
                                description=bench_cli.DESCRIPTION)
    bench_cli.add_arguments(bench)
    bench.set_defaults(run=_bench)

    # The study commands and nnunet: their modules import their packages (scikit-image, nilearn, nnunetv2) only
    # when they run.
    for name, summary in (("denoise", "train and evaluate the denoisers on scikit-image's photographs"),
                          ("segdemo", "compare the losses on MNI152 brain tissue with synthetic lesions"),
                          ("nnunet", "make nnU-Net v2 find the torch_medloss trainers: path, install, uninstall")):
        module = importlib.import_module(f"torch_medloss.{name}.cli")
        command = commands.add_parser(name, help=summary, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
