"""The backends a test can run an op on, as one pytest parameter: every op's tests run the same cases on each.

- "reference": the pure-PyTorch ground truth, on CPU tensors.
- "cpp": the C++/OpenMP kernels, on CPU tensors (built on first use; skipped under TORCH_MEDLOSS_NO_BUILD=1).
- "triton": the Triton kernels, on CUDA tensors when there is a GPU, else on CPU tensors through the interpreter
  (conftest.py sets TRITON_INTERPRET=1 before triton is imported).
- "cuda": the CUDA C++ kernels, on a GPU only.

Whether a compiled backend is there is decided when a test runs (``require``), never at import: collecting the
tests must not build the extension.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ALL = ("reference", "cpp", "triton", "cuda")
FUSED = ("cpp", "triton", "cuda")

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

_MARKS = {
    "reference": (),
    "cpp": (),
    "triton": (pytest.mark.skipif(not HAS_TRITON or not (HAS_CUDA or INTERPRETING),
                                  reason="triton needs a GPU or TRITON_INTERPRET=1"),),
    "cuda": (pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"), pytest.mark.cuda),
}


def params(*names: str) -> list:
    """pytest params for ``backend``, with the skip marks of the ones that cannot run on this machine."""
    return [pytest.param(name, marks=_MARKS[name], id=name) for name in (names or ALL)]


def device(backend: str) -> torch.device:
    """Where the backend's tensors live: CUDA for "cuda", and for "triton" on a GPU machine; else the CPU."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA and not INTERPRETING):
        return torch.device("cuda")
    return torch.device("cpu")


def require(backend: str) -> None:
    """Skip (TORCH_MEDLOSS_NO_BUILD=1) or fail (a build error) when a compiled backend is missing; builds at most
    once per process."""
    if backend not in ("cpp", "cuda"):
        return
    from torch_medloss import _extension

    reason = _extension.why_not_loaded(cuda=backend == "cuda")
    if reason is not None and os.environ.get("TORCH_MEDLOSS_NO_BUILD", "0") not in ("", "0"):
        pytest.skip(reason)
    assert reason is None, f"the {backend} extension did not build: {reason}"
