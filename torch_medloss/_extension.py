"""Build and load the C++/CUDA kernels in csrc/ on first use.

``pip install .`` compiles nothing (see setup.py): the sources ship inside the package and the first call that needs
a compiled op builds them with ``torch.utils.cpp_extension.load`` (ninja) against the torch that is running, then
loads the library, whose static initialisers register the ops (``is_python_module=False``: no Python module, the
``_C`` of STYLE.md section 2 is the library itself). ``python -m torch_medloss build`` does the same ahead of time.

The library goes to ``<cache>/<torch version>-<cpu|cuda>-<hash>/``, where ``<cache>`` is ``$TORCH_MEDLOSS_CACHE`` or
``~/.cache/torch_medloss`` and the hash covers the sources, the flags and the toolchain. A finished build leaves a
``built.ok`` marker there, naming the library; a later process that finds it loads the library without running
ninja. Changing a source, ``DEBUG``, the compiler or the CUDA architectures gives a new directory, so a stale
library is never loaded; old directories can be deleted at any time. Failed builds are not remembered: each new
process tries again.

The CUDA sources are added when ``torch.cuda.is_available()`` and torch's ``cpp_extension`` finds a CUDA toolkit.
If that build fails, the CPU part is built alone, so the C++ backend still runs and the CUDA backend reports why
it cannot.

Environment:
    TORCH_MEDLOSS_CACHE: the cache directory (default ``~/.cache/torch_medloss``).
    TORCH_MEDLOSS_NO_BUILD=1: never build or load the extension; every compiled backend reports this as its reason
        (tests of the reference fallback use it).
    DEBUG=1: build with ``-O0 -g`` (a separate cache entry).
    CXX, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS: read by ``torch.utils.cpp_extension`` as usual.

Importing this module builds nothing and touches no GPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_NO_BUILD_ENV = "TORCH_MEDLOSS_NO_BUILD"
_CACHE_ENV = "TORCH_MEDLOSS_CACHE"
_MARKER = "built.ok"
# Lines of a failed compiler run kept in the reason: the first error is usually in them, the whole log is too long.
_ERROR_TAIL_LINES = 25


@dataclass(frozen=True)
class _Outcome:
    """What the one build-and-load attempt of this process gave."""

    cpu_reason: str | None  # None: the library is loaded and its CPU kernels are registered
    cuda_reason: str | None  # None: its CUDA kernels are registered too
    path: str | None  # the loaded library
    seconds: float  # time spent building and loading
    from_cache: bool  # loaded a library built by an earlier process


_outcome: _Outcome | None = None
_lock = threading.RLock()
# Run once the library is loaded: they register the Python parts of the C++ ops (fake kernels), which torch accepts
# only for ops that exist.
_on_load: list[Callable[[], None]] = []


def source_dir() -> Path | None:
    """The csrc/ directory: inside the package when installed, beside it in a checkout or an editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    return None


def _sources(root: Path, with_cuda: bool) -> list[Path]:
    patterns = ["*.cpp", "cpu/*.cpp"] + (["cuda/*.cu"] if with_cuda else [])
    return sorted(path for pattern in patterns for path in root.glob(pattern))


def _debug() -> bool:
    return os.environ.get("DEBUG", "0") not in ("", "0")


def _flags(with_cuda: bool) -> tuple[list[str], list[str], list[str]]:
    """(C++ flags, nvcc flags, linker flags)."""
    optimise = ["-O0", "-g"] if _debug() else ["-O3"]
    # -fopenmp makes at::parallel_for's OpenMP region real; the library then needs libgomp.so.1, which resolves to
    # the one torch has already loaded (same soname), so the process keeps a single OpenMP runtime.
    cflags = [*optimise, "-fopenmp"]
    cuda_flags = ([*optimise, "-lineinfo"] if not _debug() else ["-O0", "-g", "-G"]) if with_cuda else []
    return cflags, cuda_flags, ["-fopenmp"]


def _cuda_reason() -> str | None:
    """Why the CUDA sources are left out of the build, or None to build them."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"built without CUDA: this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "built without CUDA: torch.cuda.is_available() is False"
    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return f"built without CUDA: no CUDA toolkit found (set CUDA_HOME to a CUDA {torch.version.cuda} toolkit)"
    return None


def _cache_dir(root: Path, sources: list[Path], with_cuda: bool) -> Path:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    for header in sorted([*root.rglob("*.h"), *root.rglob("*.cuh")]):
        digest.update(header.read_bytes())
    toolchain = [
        repr(_flags(with_cuda)),
        os.environ.get("CXX", "c++"),
        f"py{sys.version_info.major}.{sys.version_info.minor}",
        str(torch.version.cuda),
    ]
    if with_cuda:
        from torch.utils import cpp_extension

        # Without TORCH_CUDA_ARCH_LIST, cpp_extension compiles for the visible GPUs: a cache shared between machines
        # must not hand a library built for one architecture to another.
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or ",".join(
            f"{major}.{minor}"
            for major, minor in sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        )
        toolchain += [str(cpp_extension.CUDA_HOME), arch_list]
    digest.update("\0".join(toolchain).encode())
    base = Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "torch_medloss")
    variant = "cuda" if with_cuda else "cpu"
    return base / f"{torch.__version__}-{variant}-{digest.hexdigest()[:16]}"


def _tail(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n".join(lines[-_ERROR_TAIL_LINES:])


def _build_and_load(root: Path, with_cuda: bool, verbose: bool) -> tuple[str | None, str | None, bool]:
    """Build (unless cached) and load one variant. Returns (error, library path, from cache)."""
    from torch.utils import cpp_extension

    sources = _sources(root, with_cuda)
    directory = _cache_dir(root, sources, with_cuda)
    marker = directory / _MARKER
    if marker.exists():
        library = directory / marker.read_text().strip()
        try:
            torch.ops.load_library(str(library))
        except OSError as exc:
            return f"loading the cached {library} failed: {exc} (delete {directory} to rebuild)", None, True
        return None, str(library), True

    cflags, cuda_flags, ldflags = _flags(with_cuda)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        library = cpp_extension.load(
            name=f"torch_medloss_{'cuda' if with_cuda else 'cpu'}",
            sources=[str(path) for path in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            verbose=verbose,
            with_cuda=with_cuda,
            is_python_module=False,  # load the library (its registrations run) and return its path
        )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
        # cpp_extension raises RuntimeError with the compiler's output; load_library raises OSError.
        return f"compiling {directory} failed:\n{_tail(exc)}", None, False
    # The marker names the library (cpp_extension appends _v1, _v2 to the name when one process builds twice), and
    # is written last and atomically: a directory without it (a build killed half-way) is built again.
    partial_marker = directory / f"{_MARKER}.{os.getpid()}"
    partial_marker.write_text(f"{Path(library).name}\n")
    partial_marker.replace(marker)
    return None, str(library), False


def _load(verbose: bool) -> _Outcome:
    start = time.perf_counter()
    if os.environ.get(_NO_BUILD_ENV, "0") not in ("", "0"):
        reason = f"{_NO_BUILD_ENV}={os.environ[_NO_BUILD_ENV]} is set, so the C++/CUDA extension is not built or loaded"
        return _Outcome(reason, reason, None, 0.0, False)
    root = source_dir()
    if root is None:
        reason = f"the C++ sources (csrc/) are missing next to {Path(__file__).parent}; reinstall torch_medloss"
        return _Outcome(reason, reason, None, 0.0, False)

    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        reason = "ninja is not installed (pip install ninja)"
        return _Outcome(reason, reason, None, 0.0, False)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        reason = f"no C++ compiler found ({compiler!r} is not on PATH; install one or set CXX)"
        return _Outcome(reason, reason, None, 0.0, False)

    cuda_reason = _cuda_reason()
    if cuda_reason is None:
        error, path, cached = _build_and_load(root, with_cuda=True, verbose=verbose)
        if error is None:
            return _Outcome(None, None, path, time.perf_counter() - start, cached)
        cuda_reason = f"built without CUDA: {error}"
    error, path, cached = _build_and_load(root, with_cuda=False, verbose=verbose)
    return _Outcome(error, error if error is not None else cuda_reason, path, time.perf_counter() - start, cached)


def _get(verbose: bool = False) -> _Outcome:
    global _outcome
    with _lock:
        if _outcome is None:
            _outcome = _load(verbose)
            if _outcome.cpu_reason is None:
                for callback in _on_load:
                    callback()
        return _outcome


def when_loaded(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the library is loaded: now if it already is, else right after it loads.

    The module of each C++ op registers its fake kernel this way (it is the module that csrc/<stem>.cpp names with
    ``set_python_module``).
    """
    with _lock:
        _on_load.append(callback)
        if _outcome is not None and _outcome.cpu_reason is None:
            callback()


def why_not_loaded(cuda: bool) -> str | None:
    """None if the compiled ops are registered (with their CUDA kernels when ``cuda``); otherwise the reason.

    The first call builds and loads the extension (minutes when nothing is cached); later calls return the outcome
    of that attempt.
    """
    outcome = _get()
    if outcome.cpu_reason is not None:
        return outcome.cpu_reason
    return outcome.cuda_reason if cuda else None


def build(verbose: bool = False) -> dict[str, object]:
    """Build and load the extension now (if this process has not yet) and report what was built.

    Returns:
        ``{"cpu": bool, "cpu_reason": str | None, "cuda": bool, "cuda_reason": str | None, "path": str | None,
        "seconds": float, "from_cache": bool}``: whether the CPU and CUDA kernels are registered and why not,
        the library, the time this process spent building and loading it, and whether an earlier process built it.
    """
    outcome = _get(verbose)
    return {
        "cpu": outcome.cpu_reason is None,
        "cpu_reason": outcome.cpu_reason,
        "cuda": outcome.cpu_reason is None and outcome.cuda_reason is None,
        "cuda_reason": outcome.cuda_reason,
        "path": outcome.path,
        "seconds": outcome.seconds,
        "from_cache": outcome.from_cache,
    }
