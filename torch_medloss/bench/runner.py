"""Run the selected (workload, loss, provider) cells and measure each: median forward+backward time, peak extra
memory (GPU) and, on a GPU, the fraction of the bandwidth floor.

Timing: on a GPU ``triton.testing.do_bench(..., return_mode="median")`` (it flushes L2 between calls); on a CPU the
median of ``torch.utils.benchmark.Timer.blocked_autorange`` with all of torch's threads (the Timer defaults to one).
Memory: ``torch.cuda.max_memory_allocated`` above the inputs after a reset; on a CPU it is not measured (a process
RSS figure would mean nothing here), and the results say so.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from torch_medloss.bench import providers as _providers
from torch_medloss.bench.host_cost import count_host_cost
from torch_medloss.bench.workloads import LOSSES, Workload


@dataclass
class Result:
    """One cell. ``status``: "ok", "unavailable" (with the reason), "skipped" or "failed" (with the error)."""

    workload: str
    shape: list[int]
    dtype: str
    loss: str
    provider: str
    implementation: str
    status: str
    note: str = ""
    ms: float | None = None
    first_call_s: float | None = None
    peak_extra_mib: float | None = None
    floor_fraction: float | None = None
    # Host cost of one forward+backward (torch_medloss.bench.host_cost): PyTorch ops that launch work, and kernel
    # launches (Triton's, and this package's C++ ops); None for the compiled providers (their graph hides them).
    host_ops: int | None = None
    host_launches: int | None = None
    speedup: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    """CPU: ``min_run_time`` s per measurement; GPU: do_bench ``warmup``/``rep`` in ms."""

    min_run_time: float = 0.5
    warmup_ms: int = 25
    rep_ms: int = 100

    @classmethod
    def quick(cls) -> Timing:
        return cls(min_run_time=0.05, warmup_ms=5, rep_ms=20)


def median_ms(fn, device: torch.device, timing: Timing) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median"))
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=timing.min_run_time).median * 1e3


def peak_extra_mib(step, logits: torch.Tensor) -> float | None:
    """Peak memory one step allocates above the inputs (the gradient included), in MiB; None off CUDA."""
    if logits.device.type != "cuda":
        return None
    logits.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(device: torch.device, timing: Timing, nbytes: int = 2**30) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (as BASELINES.md); None off CUDA.
    Halves the buffer until it fits."""
    if device.type != "cuda":
        return None
    while nbytes >= 2**24:
        try:
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
            dst = torch.empty_like(src)
        except torch.cuda.OutOfMemoryError:
            nbytes //= 2
            continue
        ms = median_ms(lambda src=src, dst=dst: dst.copy_(src), device, timing)
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / (ms * 1e-3)
    return None


class Progress:
    """tqdm when installed; otherwise one stderr line per cell ("[3/34] ...")."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def start(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(text)
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def run_cell(workload: Workload, loss: str, provider: str, logits: torch.Tensor, labels: torch.Tensor,
             timing: Timing, quick: bool, floor_ms: float | None) -> Result:
    device = logits.device
    result = Result(workload.label, list(workload.shape), workload.dtype, LOSSES[loss].label, provider,
                    _providers.LABELS[provider], status="ok")
    module = None
    try:
        with warnings.catch_warnings():
            # Fallback and deprecation warnings from the losses and baselines would interleave with the progress.
            warnings.simplefilter("ignore")
            try:
                module = _providers.build(provider, loss, device, quick)
            except _providers.Unavailable as exc:
                result.status, result.note = exc.status, str(exc)
                return result

            def step():
                logits.grad = None
                module(logits, labels).backward()

            start = time.perf_counter()
            try:
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - any failure of a baseline is a result, not a crash
                result.status = "failed"
                prefix = "compile failed" if provider in _providers.COMPILED else "failed"
                result.note = f"{prefix}: {_short_error(exc)}"
                return result
            result.first_call_s = time.perf_counter() - start
            if provider not in _providers.COMPILED:
                with count_host_cost() as cost:
                    step()
                result.host_ops, result.host_launches = cost.num_ops, cost.num_launches
            result.ms = median_ms(step, device, timing)
            result.peak_extra_mib = peak_extra_mib(step, logits)
            if floor_ms is not None:
                result.floor_fraction = floor_ms / result.ms
            if device.type != "cuda":
                result.note = "peak memory not measured on CPU"
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while timing: report it and go on
        result.status, result.ms, result.peak_extra_mib = "failed", None, None
        result.note = f"failed: {_short_error(exc)}"
    finally:
        logits.grad = None
        module = None  # noqa: F841 - drop the module (and a compiled graph) before the next cell
        if provider in _providers.COMPILED:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


BASELINES = {"eager": "vs eager", "compiled": "vs compiled", "monai": "vs MONAI"}


def add_speedups(results: Sequence[Result]) -> None:
    """speedup[baseline] = baseline's median / this median, for the same workload and loss (None if either is
    missing)."""
    times = {(r.workload, r.loss, r.provider): r.ms for r in results if r.status == "ok"}
    for r in results:
        r.speedup = {}
        for baseline in BASELINES:
            reference = times.get((r.workload, r.loss, baseline))
            r.speedup[baseline] = reference / r.ms if (reference and r.ms) else None


def run(workloads: Sequence[Workload], losses: Sequence[str], provider_keys: Sequence[str], device: torch.device,
        timing: Timing, quick: bool = False, progress: bool = True) -> tuple[list[Result], dict]:
    """Measure every cell; returns the results and the per-run measurements (copy bandwidth, floors)."""
    cells = len(workloads) * len(losses) * len(provider_keys)
    bar = Progress(cells + (device.type == "cuda"), enabled=progress)
    measured: dict = {"copy_bandwidth_bytes_per_s": None, "floor_ms": {}}
    results: list[Result] = []
    try:
        if device.type == "cuda":
            bar.start("device-to-device copy bandwidth")
            measured["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device, timing)
            bar.advance()
        bandwidth = measured["copy_bandwidth_bytes_per_s"]
        for workload in workloads:
            floor_ms = workload.floor_bytes() / bandwidth * 1e3 if bandwidth else None
            measured["floor_ms"][workload.label] = floor_ms
            logits, labels = workload.make_inputs(device)
            for loss in losses:
                for provider in provider_keys:
                    bar.start(f"{workload.label} | {LOSSES[loss].label} | {_providers.LABELS[provider]}")
                    results.append(run_cell(workload, loss, provider, logits, labels, timing, quick, floor_ms))
                    bar.advance()
            del logits, labels
    finally:
        bar.close()
    add_speedups(results)
    return results, measured
