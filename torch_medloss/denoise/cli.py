"""Arguments and entry point of ``python -m torch_medloss denoise`` (placeholder until the command lands)."""

from __future__ import annotations

import argparse

DESCRIPTION = "Train and evaluate denoisers (DnCNN, Lattice Fusion Network, twin frequency denoiser)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train", "eval"])


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
