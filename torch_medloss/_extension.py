"""Find or build the C++/CUDA kernels in csrc/ and load them.

``pip install .`` compiles nothing (see setup.py): the sources ship inside the package, and the first call that
needs a compiled op gets the library from the first of these that has it:

1. the wheel: a wheel built with ``TORCH_MEDLOSS_PREBUILT=1 pip wheel --no-build-isolation .`` carries the library
   in ``torch_medloss/_prebuilt/<entry>/``. It loads without a compiler when the running torch, the sources and the
   flags are the ones it was built for (the same ``<entry>`` name); otherwise it is ignored and 3. builds.
2. the cache, ``<cache>/<entry>/``, where ``<cache>`` is ``$TORCH_MEDLOSS_CACHE`` or ``~/.cache/torch_medloss``:
   filled by an earlier process or ahead of time by ``python -m torch_medloss build``. Loading from it needs no
   compiler either, so one directory prepared once (on a login node, say) serves every node that mounts it.
3. a build into the cache with ``torch.utils.cpp_extension.load`` (ninja) against the running torch. It says so on
   stderr, one line before it starts (with the time it should take) and one when it is done; ``python -m
   torch_medloss build`` also prints a line per compiled file. A failed build keeps the compiler's output in
   ``<cache>/<entry>/build.log`` and its reason names that file. Failed builds are not remembered: each new process
   tries again.

``<entry>`` is ``<torch version>-<cpu|cuda>-<hash>``; the hash covers the sources and headers, the flags, the
compiler's name, the Python version, torch's CUDA version and, for CUDA, the architectures. Changing any of them
gives a new entry, so a stale library is never loaded; old entries can be deleted at any time. A finished entry
holds a ``built.ok`` marker naming the library, written last and atomically (a build killed half-way is finished
by the next one), and a ``manifest.json`` saying what was built and how long it took.

Concurrent first uses (several processes, one cache, e.g. the ranks of a job): a build holds an exclusive lock
(``fcntl.flock`` on ``<cache>/<entry>.lock``); the others say that they wait, then load what it built. The lock dies
with its process, so a killed build never blocks the next.

Instruction sets: on x86-64 every build compiles the baseline, AVX2 and AVX-512 versions of the float32 kernels,
each in its own file (csrc/cpu/isa.h), and the library picks one at run time, so a library built on one machine
runs, at that machine's best speed, on any x86-64 machine (a shared cache, a wheel). Elsewhere only the baseline
files are compiled. The CUDA sources are added when ``torch.cuda.is_available()`` and torch's ``cpp_extension``
finds a CUDA toolkit; a CUDA library found in the wheel or the cache loads without a toolkit. If the CUDA build
fails, the CPU part is built alone, so the C++ backend still runs and the CUDA backend reports why it cannot.

Environment:
    TORCH_MEDLOSS_CACHE: the cache directory (default ``~/.cache/torch_medloss``).
    TORCH_MEDLOSS_NO_BUILD=1: never build or load the extension; every compiled backend reports this as its reason
        (tests of the reference fallback use it).
    DEBUG=1: build with ``-O0 -g`` (a separate entry).
    CXX, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS: read by ``torch.utils.cpp_extension`` as usual. On a cluster
        with CUDA, build where the jobs' GPUs are visible or set TORCH_CUDA_ARCH_LIST the same way for the build and
        the jobs: the architectures are part of ``<entry>``.

Importing this module builds nothing and touches no GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked (cpp_extension's own lock file still guards the directory)
    fcntl = None

_NO_BUILD_ENV = "TORCH_MEDLOSS_NO_BUILD"
_CACHE_ENV = "TORCH_MEDLOSS_CACHE"
_MARKER = "built.ok"
_MANIFEST = "manifest.json"
_LOG = "build.log"
# The package directory a wheel built with TORCH_MEDLOSS_PREBUILT=1 carries its libraries in (see setup.py).
_PREBUILT = "_prebuilt"
# The files of csrc/ a build compiles, relative to it, and the headers it may include (at any depth); setup.py ships
# the same (keep them equal: the hash must see the same files in a checkout and in an installed package).
_SOURCE_PATTERNS = ("*.cpp", "cpu/*.cpp")
_CUDA_SOURCE_PATTERNS = ("cuda/*.cu",)
_HEADER_SUFFIXES = (".h", ".cuh", ".hpp", ".inc")
# The per-instruction-set files (csrc/cpu/isa.h), compiled on x86-64 only.
_X86_ONLY_SUFFIXES = ("_avx2.cpp", "_avx512.cpp")
# Lines of a failed compiler run kept in the reason: the first error is usually in them; the log has them all.
_ERROR_TAIL_LINES = 25
# CPU seconds of a CPU-only build on the 2-core AMD EPYC of the README's benchmarks (the sum of the compile times of
# the csrc/ files, 2026-12), for the time announced before a first build when this cache has not built one yet. The
# CUDA figure per .cu file is a guess: no CUDA build has been timed yet (the first one records its time).
_REFERENCE_CPU_SECONDS = 150.0
_REFERENCE_CUDA_SECONDS_PER_FILE = 60.0


@dataclass(frozen=True)
class _Outcome:
    """What the one find-or-build-and-load attempt of this process gave."""

    cpu_reason: str | None  # None: the library is loaded and its CPU kernels are registered
    cuda_reason: str | None  # None: its CUDA kernels are registered too
    path: str | None  # the loaded library
    seconds: float  # time spent finding, building and loading it
    origin: str | None  # "wheel", "cache" or "built" (by this process)

    @property
    def from_cache(self) -> bool:
        return self.origin in ("wheel", "cache")


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


def cache_dir() -> Path:
    """``$TORCH_MEDLOSS_CACHE`` or ``~/.cache/torch_medloss``."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "torch_medloss")


def _prebuilt_dir() -> Path:
    return Path(__file__).resolve().parent / _PREBUILT


def _say(message: str) -> None:
    """One line on stderr: a build the user waits for is never silent."""
    print(f"torch_medloss: {message}", file=sys.stderr, flush=True)


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _sources(root: Path, with_cuda: bool) -> list[Path]:
    patterns = _SOURCE_PATTERNS + (_CUDA_SOURCE_PATTERNS if with_cuda else ())
    sources = sorted(path for pattern in patterns for path in root.glob(pattern))
    if not _x86():
        sources = [path for path in sources if not path.name.endswith(_X86_ONLY_SUFFIXES)]
    return sources


def _local_includes(path: Path, seen: set[Path]) -> int:
    """Bytes of path and of the csrc headers it includes (with quotes), each counted once."""
    if path in seen or not path.is_file():
        return 0
    seen.add(path)
    text = path.read_text(errors="replace")
    total = len(text)
    for line in text.splitlines():
        if line.startswith('#include "'):
            total += _local_includes(path.parent / line.split('"')[1], seen)
    return total


def _build_order(sources: list[Path]) -> list[Path]:
    """The sources, the longest compiles first (by the bytes of csrc code each compiles). Ninja starts its jobs in
    this order, so the long files do not start last and leave a core idle at the end of the build."""
    return sorted(sources, key=lambda path: (-_local_includes(path, set()), path.name))


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


def _cuda_wanted() -> str | None:
    """Why this process does not want the CUDA kernels, or None when it does."""
    if torch.version.cuda is None:
        return f"built without CUDA: this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "built without CUDA: torch.cuda.is_available() is False"
    return None


def _cuda_toolkit() -> str | None:
    """Why the CUDA sources cannot be compiled here, or None."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return f"built without CUDA: no CUDA toolkit found (set CUDA_HOME to a CUDA {torch.version.cuda} toolkit)"
    return None


def _cuda_arch_list() -> str:
    # Without TORCH_CUDA_ARCH_LIST, cpp_extension compiles for the visible GPUs: a cache shared between machines
    # must not hand a library built for one architecture to another.
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or ",".join(
        f"{major}.{minor}"
        for major, minor in sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    )


def _entry_name(root: Path, sources: list[Path], with_cuda: bool) -> str:
    """``<torch version>-<cpu|cuda>-<hash>``: the same in a checkout, in an installed package, on any node; computed
    without a compiler (a node that only loads has none)."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    for header in sorted(path for path in root.rglob("*") if path.suffix in _HEADER_SUFFIXES and path.is_file()):
        digest.update(header.relative_to(root).as_posix().encode())
        digest.update(header.read_bytes())
    toolchain = [
        repr(_flags(with_cuda)),
        os.environ.get("CXX", "c++"),
        f"py{sys.version_info.major}.{sys.version_info.minor}",
        str(torch.version.cuda),
    ]
    if with_cuda:
        toolchain.append(_cuda_arch_list())
    digest.update("\0".join(toolchain).encode())
    return f"{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:16]}"


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-_ERROR_TAIL_LINES:])


def _first_error(text: str) -> str:
    """The compiler's (or the linker's) first error line, or the last line of the output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line.lower() or "undefined reference" in line:  # "file:line:col: error: ...", ld's
            return line
    return lines[-1] if lines else "no output"


def _load_entry(directory: Path) -> tuple[str | None, str]:
    """Load the library a finished entry names. Returns (error, library path)."""
    library = directory / (directory / _MARKER).read_text().strip()
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:
        return f"loading {library} failed: {exc} (delete {directory} to rebuild it)", str(library)
    return None, str(library)


def _find(name: str) -> tuple[Path, str] | None:
    """(entry directory, "wheel" or "cache") of a finished entry, or None."""
    for base, origin in ((_prebuilt_dir(), "wheel"), (cache_dir(), "cache")):
        if (base / name / _MARKER).is_file():
            return base / name, origin
    return None


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold the build lock of one entry; says so when another process holds it and this one waits."""
    if fcntl is None:
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is building the C++ kernels in {directory}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _objects(sources: list[Path]) -> list[str]:
    """The object files cpp_extension's ninja file makes of the sources."""
    return [f"{path.stem}.cuda.o" if path.suffix == ".cu" else f"{path.stem}.o" for path in sources]


class _Progress:
    """Prints ``[k/N] <source> (t s)`` on stderr as ninja finishes each object of a build, by watching the build
    directory (cpp_extension shows ninja's own output only with its whole command lines)."""

    def __init__(self, directory: Path, sources: list[Path]) -> None:
        self._directory = directory
        self._pending = dict(zip(_objects(sources), (path.name for path in sources), strict=True))
        self._total = len(sources)
        self._done = 0
        self._start = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="torch_medloss-build-progress", daemon=True)

    def _poll(self) -> None:
        for obj, source in list(self._pending.items()):
            path = self._directory / obj
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= self._start - 1:
                    del self._pending[obj]
                    self._done += 1
                    _say(f"[{self._done}/{self._total}] {source} ({time.time() - self._start:.0f} s)")

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def __enter__(self) -> _Progress:
        # Objects a killed build left are up to date: ninja will not recompile them.
        for obj in list(self._pending):
            if (self._directory / obj).exists():
                del self._pending[obj]
                self._done += 1
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


def _estimate_seconds(with_cuda: bool, sources: list[Path]) -> float:
    """How long a build should take: the last build of this variant in this cache (scaled to this machine's
    cores), else the reference machine's CPU seconds spread over the cores ninja uses."""
    cores = max(1, min(os.cpu_count() or 1, int(os.environ.get("MAX_JOBS") or 1 << 10)))
    variant = "cuda" if with_cuda else "cpu"
    manifests = sorted(cache_dir().glob(f"*-{variant}-*/{_MANIFEST}"), key=lambda path: path.stat().st_mtime)
    for manifest in reversed(manifests):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(manifest.read_text())
            return float(data["seconds"]) * min(float(data["cores"]), len(sources)) / min(cores, len(sources))
    cuda_files = sum(path.suffix == ".cu" for path in sources)
    work = _REFERENCE_CPU_SECONDS + cuda_files * _REFERENCE_CUDA_SECONDS_PER_FILE
    return work / min(cores, len(sources)) + 5.0


def _build(root: Path, sources: list[Path], directory: Path, with_cuda: bool, verbose: bool,
           progress: bool) -> tuple[str | None, str | None]:
    """Compile and load one entry; the caller holds its lock. Returns (error, library path)."""
    from torch.utils import cpp_extension

    what = "C++ and CUDA kernels" if with_cuda else "C++ kernels"
    estimate = _estimate_seconds(with_cuda, sources)
    _say(f"building the {what} for this torch, once, about {estimate:.0f} s; python -m torch_medloss build does it "
         "ahead of time")
    start = time.perf_counter()
    cflags, cuda_flags, ldflags = _flags(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    # A lock file of cpp_extension's left by a killed build would make it wait forever; we hold the entry's lock.
    (directory / "lock").unlink(missing_ok=True)
    ordered = _build_order(sources)
    watcher = _Progress(directory, ordered) if progress else contextlib.nullcontext()
    try:
        with watcher:
            library = cpp_extension.load(
                name=f"torch_medloss_{'cuda' if with_cuda else 'cpu'}",
                sources=[str(path) for path in ordered],
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags,
                extra_ldflags=ldflags,
                build_directory=str(directory),
                verbose=verbose,
                with_cuda=with_cuda,
                is_python_module=False,  # load the library (its registrations run) and return its path
            )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
        # cpp_extension raises RuntimeError with ninja's whole output (the compiler's errors); load_library OSError.
        output = str(exc)
        log = directory / _LOG
        log.write_text(output)
        _say(f"building the {what} failed after {time.perf_counter() - start:.0f} s: {_first_error(output)}; "
             f"the full log is {log}")
        return f"compiling {directory} failed (full log: {log}):\n{_tail(output)}", None
    seconds = time.perf_counter() - start
    manifest = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "variant": "cuda" if with_cuda else "cpu",
        "sources": [path.relative_to(root).as_posix() for path in sources],
        "cuda_arch_list": _cuda_arch_list() if with_cuda else None,
        "seconds": round(seconds, 1),
        "cores": os.cpu_count(),
    }
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    # The marker names the library (cpp_extension appends _v1, _v2 to the name when one process builds twice), and
    # is written last and atomically: a directory without it (a build killed half-way) is built again.
    partial_marker = directory / f"{_MARKER}.{os.getpid()}"
    partial_marker.write_text(f"{Path(library).name}\n")
    partial_marker.replace(directory / _MARKER)
    _say(f"built the {what} in {seconds:.0f} s ({directory})")
    return None, str(library)


def _toolchain() -> str | None:
    """Why nothing can be compiled here, or None."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install one or set CXX)"
    return None


def _get_or_build(root: Path, with_cuda: bool, verbose: bool, progress: bool,
                  build: bool) -> tuple[str | None, str | None, str | None, Path | None]:
    """Find (in the wheel or the cache) or build one variant, and load it.

    Returns (error, library path, origin, entry directory); with ``build`` False, a variant that is not there is an
    error rather than a build.
    """
    sources = _sources(root, with_cuda)
    name = _entry_name(root, sources, with_cuda)
    found = _find(name)
    if found is None and build:
        reason = _toolchain() or (_cuda_toolkit() if with_cuda else None)
        if reason is not None:
            return reason, None, None, None
        directory = cache_dir() / name
        with _exclusive(directory):
            found = _find(name)  # another process may have built it while this one waited
            if found is None:
                error, library = _build(root, sources, directory, with_cuda, verbose, progress)
                return error, library, None if error else "built", directory
    if found is None:
        return f"not built ({name} is neither in the wheel nor in {cache_dir()})", None, None, None
    directory, origin = found
    error, library = _load_entry(directory)
    return error, None if error else library, None if error else origin, directory


def _load(verbose: bool, progress: bool = False) -> tuple[_Outcome, Path | None]:
    start = time.perf_counter()
    if os.environ.get(_NO_BUILD_ENV, "0") not in ("", "0"):
        reason = f"{_NO_BUILD_ENV}={os.environ[_NO_BUILD_ENV]} is set, so the C++/CUDA extension is not built or loaded"
        return _Outcome(reason, reason, None, 0.0, None), None
    root = source_dir()
    if root is None:
        reason = f"the C++ sources (csrc/) are missing next to {Path(__file__).parent}; reinstall torch_medloss"
        return _Outcome(reason, reason, None, 0.0, None), None

    cuda_reason = _cuda_wanted()
    if cuda_reason is None:
        # A CUDA library already built loads without a toolkit; building one needs it (else: the CPU variant).
        toolkit_reason = _cuda_toolkit()
        error, path, origin, directory = _get_or_build(root, True, verbose, progress, build=toolkit_reason is None)
        if error is None:
            return _Outcome(None, None, path, time.perf_counter() - start, origin), directory
        cuda_reason = toolkit_reason or f"built without CUDA: {error}"
    error, path, origin, directory = _get_or_build(root, False, verbose, progress, build=True)
    reason = error if error is not None else cuda_reason
    return _Outcome(error, reason, path, time.perf_counter() - start, origin), directory


_directory: Path | None = None  # the entry the library was loaded from


def _get(verbose: bool = False, progress: bool = False) -> _Outcome:
    global _outcome, _directory
    with _lock:
        if _outcome is None:
            _outcome, _directory = _load(verbose, progress)
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

    The first call finds, or builds (about 80 s on 2 cores), and loads the extension; later calls
    return the outcome of that attempt.
    """
    outcome = _get()
    if outcome.cpu_reason is not None:
        return outcome.cpu_reason
    return outcome.cuda_reason if cuda else None


def build(verbose: bool = False, progress: bool = True) -> dict[str, object]:
    """Find or build and load the extension now (if this process has not yet) and report it.

    Args:
        verbose: show the compiler commands and output.
        progress: print a line per compiled file on stderr.

    Returns:
        ``{"cpu": bool, "cpu_reason": str | None, "cuda": bool, "cuda_reason": str | None, "path": str | None,
        "seconds": float, "origin": "wheel" | "cache" | "built" | None, "from_cache": bool}``: whether the CPU and
        CUDA kernels are registered and why not, the library, the time this process spent on it, and where the
        library came from (``from_cache``: the wheel or the cache, built by an earlier process).
    """
    outcome = _get(verbose, progress)
    return {
        "cpu": outcome.cpu_reason is None,
        "cpu_reason": outcome.cpu_reason,
        "cuda": outcome.cpu_reason is None and outcome.cuda_reason is None,
        "cuda_reason": outcome.cuda_reason,
        "path": outcome.path,
        "seconds": outcome.seconds,
        "origin": outcome.origin,
        "from_cache": outcome.from_cache,
    }


def prebuild(target: Path) -> list[Path]:
    """Find or build the extension as :func:`build` does and copy its entry into ``target`` (the ``_prebuilt``
    directory of a wheel being built; see setup.py). Returns the copied entries; raises RuntimeError when the CPU part
    could not be built (the wheel was asked to carry it)."""
    report = build(progress=True)
    if not report["cpu"] or _directory is None:
        raise RuntimeError(f"TORCH_MEDLOSS_PREBUILT: the C++ extension could not be built: {report['cpu_reason']}")
    destination = Path(target) / _directory.name
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    library = (_directory / _MARKER).read_text().strip()
    for name in (library, _MANIFEST, _MARKER):  # the marker last: a half-copied entry is not one
        if (_directory / name).exists():
            shutil.copy2(_directory / name, destination / name)
    return [destination]
