"""The device a launch runs on.

Triton launches on the *current* CUDA device and its current stream, and neither ``triton_op`` nor the dispatcher
sets a device guard: without one, tensors on cuda:1 while cuda:0 is current are refused by Triton (or, with peer
access, run on the wrong GPU, unordered with cuda:1's stream). Every launcher wraps its launch in ``on_device``.
(torch.compile adds its own guard; autograd's backward threads set the device too.)
"""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor):
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor; nothing for a CPU tensor (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
