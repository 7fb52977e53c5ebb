"""Arguments and entry point of ``python -m torch_medloss segdemo`` (placeholder until the command lands)."""

from __future__ import annotations

import argparse

DESCRIPTION = "Compare the losses on a small U-Net trained on MNI152 brain tissue with synthetic lesions."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
