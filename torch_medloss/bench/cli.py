"""Arguments and entry point of ``python -m torch_medloss bench`` (see torch_medloss.bench)."""

from __future__ import annotations

import argparse
import sys

from torch_medloss.bench import workloads as _workloads

DESCRIPTION = (
    "Time forward+backward of the losses (Dice, PM Dice, Dice+CE, focal, Dice+focal, DBCE, balanced CE) with each "
    "fused backend that can run here, the reference in eager mode and under torch.compile, MONAI and nnU-Net when "
    "installed, and count each one's host cost (PyTorch ops and kernel launches per call). Runs on the GPU when there "
    "is one (the workloads of shared/BASELINES.md), else on the CPU (scaled-down workloads)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one small workload and short timing (on a CPU also without torch.compile)")
    parser.add_argument("--shape", action="append", type=_workloads.parse_shape, metavar="B,C,*S",
                        help="a logits shape, e.g. 2,4,48,48,48; repeat for several (default: the device's set)")
    parser.add_argument("--dtype", type=_workloads.parse_dtypes, metavar="DTYPES",
                        help="comma-separated: float32, bfloat16, float16 (default: the device's set; float32 "
                        "with --shape)")
    parser.add_argument("--losses", type=_workloads.parse_losses, metavar="LOSSES",
                        help=f"comma-separated, from {', '.join(_workloads.LOSSES)} (default: all)")
    parser.add_argument("--providers", type=_workloads.parse_providers, metavar="IMPLS",
                        help="comma-separated, from fused, " + ", ".join(_workloads.PROVIDERS)
                        + " (default: the device's fused backends, eager, compiled, monai, nnunet, and on a GPU "
                        "nnunet_compiled)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto (default): cuda when available")
    parser.add_argument("--json", metavar="PATH", help="write every figure, the machine and the versions as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--ops", action="store_true",
                        help="time the denoising ops instead of the losses: a Lattice Fusion Network node "
                        "(concat_conv2d against torch.cat + conv2d), an LFN training step, frequency_split")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table; write --json and --plot. Exit 1 only when --plot could not be written."""
    import torch

    from torch_medloss.bench import report, runner

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.ops:
        return _run_ops(args, device)
    plot_problem = report.plot_available() if args.plot else None
    if plot_problem:
        print(f"bench: {plot_problem}; running the rest", file=sys.stderr)
    workloads = _workloads.select_workloads(device, args.quick, args.shape, args.dtype)
    losses = args.losses or list(_workloads.LOSSES)
    providers = _workloads.expand_providers(args.providers, device)
    timing = runner.Timing.quick() if args.quick else runner.Timing()
    load_before = report.load_average()
    results, measured = runner.run(workloads, losses, providers, device, timing, quick=args.quick,
                                   progress=not args.no_progress)
    env = report.environment(device)
    env["load_average_before"] = load_before
    print(report.markdown(results, env, measured), end="")
    if args.json:
        report.write_json(args.json, results, env, measured, workloads)
        print(f"\nbench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        if plot_problem:
            print(f"bench: {plot_problem}", file=sys.stderr)
            return 1
        report.write_plot(args.plot, results, env)
        print(f"bench: wrote {args.plot}", file=sys.stderr)
    return 0


def _run_ops(args: argparse.Namespace, device) -> int:
    from torch_medloss.bench import ops, runner

    ignored = [flag for flag, value in (("--shape", args.shape), ("--dtype", args.dtype), ("--losses", args.losses),
                                        ("--providers", args.providers), ("--plot", args.plot)) if value]
    if ignored:
        print(f"bench --ops: {', '.join(ignored)} apply to the losses only; ignored", file=sys.stderr)
    timing = runner.Timing.quick() if args.quick else runner.Timing()
    _, text = ops.run(device, args.quick, timing, progress=not args.no_progress, json_path=args.json)
    print(text, end="")
    if args.json:
        print(f"\nbench: wrote {args.json}", file=sys.stderr)
    return 0
