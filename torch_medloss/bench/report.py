"""The results as a markdown table, a JSON file (every figure with the machine, versions and date) and an optional
PNG bar chart (matplotlib, an optional extra)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence

import torch

from torch_medloss.bench.runner import BASELINES, Result

TIMING = {
    "cuda": 'triton.testing.do_bench(return_mode="median"), forward+backward',
    "cpu": "torch.utils.benchmark blocked_autorange median, forward+backward",
}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a busy machine makes CPU timings noisy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict:
    """The machine, the versions and the date (UTC) of this run."""
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "monai": _version("monai"),
        "nnunetv2": _version("nnunetv2"),
        "torch_medloss": _version("torch_medloss"),
        "timing": TIMING["cuda" if device.type == "cuda" else "cpu"],
    }


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(results: Sequence[Result], env: dict, measured: dict) -> str:
    """One table per workload; rows the loss x implementation cells, in run order."""
    gpu = env["device"] == "cuda"
    bandwidth = measured.get("copy_bandwidth_bytes_per_s")
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "monai", "nnunetv2") if env[name])
    lines = [f"torch_medloss bench on {env['device_name']} ({env['device'].upper()}, {env['threads']} threads), "
             f"{env['date']}; {versions}.",
             f"Median forward+backward time in ms ({env['timing']}); speedup = baseline time / this time."]
    if gpu:
        copy = f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "not measured"
        lines.append(f"Peak extra memory: torch.cuda.max_memory_allocated above the inputs, MiB. Floor: (2 x logits + "
                     f"gradient + 2 x labels) bytes / device copy bandwidth ({copy}, measured in this run).")
    else:
        lines.append("Peak memory is not measured on CPU; the bandwidth floor is a GPU figure.")
        load = env.get("load_average_before")
        if load is not None and load > 0.5 * (os.cpu_count() or 1):
            lines.append(f"Warning: load average {load:.1f} on {os.cpu_count()} cores before the run: other processes "
                         "shared the CPU, so these times are noisy.")
    lines.append("Host cost: PyTorch ops that launch work + kernel launches (Triton kernels; this package's C++ ops "
                 "count one each) in one forward+backward, counted with a dispatch mode and a launch hook"
                 + ("." if gpu else "; on CPU tensors the label check (3 ops) runs too, on CUDA only with "
                    "validate=True."))
    columns = ["loss", "implementation", "ms", *BASELINES.values(), "host ops + launches", "peak extra MiB"]
    if gpu:
        columns.append("of floor")
    columns.append("note")
    workloads = list(dict.fromkeys(r.workload for r in results))
    for workload in workloads:
        floor_ms = measured.get("floor_ms", {}).get(workload)
        floor = f" (floor {floor_ms * 1e3:.1f} us)" if floor_ms else ""
        lines += ["", f"### {workload}{floor}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        for r in (r for r in results if r.workload == workload):
            if r.status != "ok":
                cells = [r.loss, r.implementation, "-", *("-" for _ in BASELINES), "-", "-"]
                if gpu:
                    cells.append("-")
                cells.append(r.note)
            else:
                memory = "not measured on CPU" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.0f}"
                host = "-" if r.host_ops is None else f"{r.host_ops} + {r.host_launches}"
                cells = [r.loss, r.implementation, _ms(r.ms), *(_speedup(r.speedup.get(b)) for b in BASELINES),
                         host, memory]
                if gpu:
                    cells.append("-" if r.floor_fraction is None else f"{100 * r.floor_fraction:.0f}%")
                cells.append("" if r.note == "peak memory not measured on CPU" else r.note)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[Result], env: dict, measured: dict, workloads: Sequence) -> dict:
    return {
        "environment": env,
        "copy_bandwidth_bytes_per_s": measured.get("copy_bandwidth_bytes_per_s"),
        "workloads": [
            {"label": w.label, "shape": list(w.shape), "dtype": w.dtype, "labels_dtype": "int64",
             "floor_bytes": w.floor_bytes(), "floor_ms": measured.get("floor_ms", {}).get(w.label)}
            for w in workloads
        ],
        "results": [r.to_dict() for r in results],
    }


def write_json(path: str, results: Sequence[Result], env: dict, measured: dict, workloads: Sequence) -> None:
    with open(path, "w") as handle:
        json.dump(to_json(results, env, measured, workloads), handle, indent=1)
        handle.write("\n")


def plot_available() -> str | None:
    """None if matplotlib can be imported; otherwise the reason."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): --plot cannot write a chart"
    return None


def write_plot(path: str, results: Sequence[Result], env: dict) -> None:
    """Grouped bars, one panel per workload: median ms per loss and implementation, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in results))
    implementations = list(dict.fromkeys(r.implementation for r in results))
    figure, axes = plt.subplots(len(workloads), 1, figsize=(11, 3.6 * len(workloads)), squeeze=False)
    width = 0.8 / max(len(implementations), 1)
    for axis, workload in zip(axes[:, 0], workloads, strict=True):
        rows = [r for r in results if r.workload == workload]
        losses = list(dict.fromkeys(r.loss for r in rows))
        for i, implementation in enumerate(implementations):
            times = {r.loss: r.ms for r in rows if r.implementation == implementation and r.ms}
            xs = [j + (i - (len(implementations) - 1) / 2) * width for j, loss in enumerate(losses) if loss in times]
            axis.bar(xs, [times[loss] for loss in losses if loss in times], width, label=implementation)
        axis.set_xticks(range(len(losses)), losses)
        axis.set_yscale("log")
        axis.set_ylabel("forward+backward ms")
        axis.set_title(workload)
    axes[0, 0].legend(fontsize="small", ncol=2)
    figure.suptitle(f"torch_medloss bench, {env['device_name']}, torch {env['torch']}, {env['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
