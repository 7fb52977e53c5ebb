"""Argument types shared by the commands (``python -m torch_medloss denoise|segdemo``)."""

from __future__ import annotations

import argparse


def integer(text: str, minimum: int, expected: str) -> int:
    """int(text) when it is >= minimum, else argparse's error naming what was expected (int() rules: "00", "+3")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive(text: str) -> int:
    """An integer >= 1."""
    return integer(text, 1, "an integer >= 1")
