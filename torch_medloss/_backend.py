"""The one place that chooses which implementation of an op runs.

Every op declares the backends it has (``reference`` always; ``cpp``, ``cuda`` and ``triton`` as kernels land).
``backend="auto"`` takes the fastest declared backend that can run on the tensors' device:

- CUDA tensors: triton, then cuda, then reference;
- CPU tensors: cpp, then reference.

When a declared fast backend cannot run (the extension failed to build, triton is missing), ``auto`` falls back to
the reference and warns once per (op, backend, reason), saying why. A backend asked for by name that cannot run
raises ``ValueError`` with the reason: it never silently runs something else.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")

_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}
_warned: set[tuple[str, str, str]] = set()


def check_backend_name(backend: object) -> str:
    """Validate a ``backend=`` argument once, at construction time."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    return backend


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1`` (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``; otherwise the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            return f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed; pip install triton==3.6.0"
        if importlib.util.find_spec("torch_medloss.kernels") is None:
            # kernels/ becomes torch_medloss.kernels only through setup.py's package_dir (a bare checkout lacks it).
            return "torch_medloss.kernels is missing: install torch_medloss (pip install -e . in a checkout)"
        return None
    from torch_medloss import _extension  # deferred: importing it must not trigger a build

    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got {device.type} tensors"
        return _extension.why_not_loaded(cuda=False)
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA backend runs on CUDA tensors, got {device.type} tensors"
        return _extension.why_not_loaded(cuda=True)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")


# torch.compile must treat the answer as a constant: it runs the function once while tracing instead of tracing the
# extension's lock and file checks, which would break the graph. This is the attribute that
# torch.compiler.assume_constant_result sets (tests/test_backend.py checks that it still is); setting it directly
# keeps `import torch_medloss` from importing torch._dynamo (about 0.8 s, and triton with it).
why_unavailable._dynamo_marked_constant = True


def resolve(op: str, backend: str, device: torch.device, declared: Iterable[str], blocker: str | None = None) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    Args:
        op: the op's public name, used in messages.
        backend: the user's choice, one of ``BACKENDS``.
        device: the device of the op's tensors.
        declared: the backends this op has an implementation for.
        blocker: why this call's options cannot run fused (e.g. an arbitrary ``other_act``), or None. It rules out
            every backend but the reference: a named backend raises; "auto" falls back with one warning where it
            would otherwise have picked a fused backend, and otherwise says (as without a blocker) why none can run.
    """
    declared = tuple(declared)
    if blocker is not None and backend != "reference":
        if backend != "auto":
            raise ValueError(f"backend={backend!r} cannot run {op}: {blocker}.")
        if _first_runnable(declared, device) != "reference":
            _warn_once(op, "fused", blocker)
            return "reference"
    if backend != "auto":
        if backend not in declared:
            raise ValueError(f"{op} has no {backend!r} backend (it has: {', '.join(declared)}).")
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op}: {reason}.")
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if candidate not in declared:
            continue
        reason = why_unavailable(candidate, device)
        if reason is None:
            return candidate
        _warn_once(op, candidate, reason)
    return "reference"


def _first_runnable(declared: tuple[str, ...], device: torch.device) -> str:
    """What "auto" would pick for ``device``, without warning."""
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in declared and why_unavailable(candidate, device) is None:
            return candidate
    return "reference"


def _warn_once(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"torch_medloss: {op} falls back from the {backend} backend to the reference: {reason}.",
                      stacklevel=4)
