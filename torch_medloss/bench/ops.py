"""``python -m torch_medloss bench --ops``: the denoising ops against what people write today.

- concat_conv2d, one Lattice Fusion Network node (concatenate, conv3x3, bias, ReLU), forward and forward+backward:
  the fused op (Triton on a GPU) against ``torch.cat`` + ``F.conv2d`` (cuDNN on a GPU) and against the split-weight
  reference (sum of per-input convolutions), with TFLOP/s (2 x B x H x W x O x sum C x K^2 per forward; a backward
  costs two forwards, so forward+backward counts three).
- One training step of the default LatticeFusionNet (forward, MSE, backward, Adam) built on ConcatConv2d against the
  same network built from ``torch.cat`` and ``nn.Conv2d`` with the same weights.
- frequency_split: the fused split against the reference (pad + two depthwise conv2d + subtract), forward and
  forward+backward, with the forward's fraction of the device copy bandwidth counting one read of x and two writes.

Shapes: on a GPU the node shapes of shared/BASELINES.md in bf16, channels_last, and the 512^2 images of the issue;
on a CPU scaled-down shapes in float32 (there the fused Triton kernels cannot run, so the table compares the reference
paths, and says so).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_medloss import _backend
from torch_medloss.bench import report
from torch_medloss.bench.runner import Progress, Timing, copy_bandwidth, median_ms
from torch_medloss.functional import concat_conv2d, frequency_split
from torch_medloss.nn import ConcatConv2d


@dataclasses.dataclass(frozen=True)
class NodeShape:
    batch: int
    height: int
    width: int
    inputs: tuple[int, ...]
    out_channels: int

    @property
    def label(self) -> str:
        same = len(set(self.inputs)) == 1
        count = f"{len(self.inputs)} x {self.inputs[0]}" if same else " + ".join(map(str, self.inputs))
        return f"B{self.batch} {self.height}x{self.width}, {count} ch -> {self.out_channels}"

    def forward_flops(self, kernel: int = 3) -> float:
        return 2.0 * self.batch * self.height * self.width * self.out_channels * sum(self.inputs) * kernel * kernel


GPU_NODES = (NodeShape(16, 128, 128, (64, 64), 64), NodeShape(16, 128, 128, (64, 64, 64), 64),
             NodeShape(8, 256, 256, (32, 32, 32, 32), 64))
CPU_NODES = (NodeShape(2, 64, 64, (16, 16), 16), NodeShape(2, 64, 64, (16, 16, 16), 16))
QUICK_NODES = (NodeShape(1, 32, 32, (8, 8), 8),)
GPU_IMAGES = ((16, 1, 512, 512), (16, 3, 512, 512))
CPU_IMAGES = ((4, 1, 256, 256),)
QUICK_IMAGES = ((2, 1, 64, 64),)
SPLIT_SIGMA = 2.0


@dataclasses.dataclass
class Row:
    """One measurement. ``status`` "ok", or "unavailable"/"failed" with the reason in ``note``."""

    op: str
    workload: str
    dtype: str
    implementation: str
    pass_: str
    status: str = "ok"
    ms: float | None = None
    tflops: float | None = None
    bandwidth_fraction: float | None = None
    speedup: float | None = None
    note: str = ""


def _fused_reason(device: torch.device) -> str | None:
    return _backend.why_unavailable("triton", device)


def _timed(row: Row, fn: Callable[[], object], device: torch.device, timing: Timing) -> Row:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
            row.ms = median_ms(fn, device, timing)
    except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not a crash
        row.status, row.note = "failed", f"failed: {str(exc).splitlines()[0][:150] if str(exc) else type(exc)}"
    return row


# ------------------------------------------------------------------------------------------------- concat conv


def _node_impls(device: torch.device) -> dict[str, Callable | str]:
    """name -> f(inputs, weight, bias) or the reason it cannot run here."""

    def cat_conv(inputs, weight, bias):
        return F.relu(F.conv2d(torch.cat(inputs, 1), weight, bias, padding=1))

    impls: dict[str, Callable | str] = {"torch.cat + conv2d": cat_conv}
    reason = _fused_reason(device)
    impls["concat_conv2d (triton)"] = reason or (
        lambda inputs, weight, bias: concat_conv2d(inputs, weight, bias, 1, "relu", backend="triton"))
    impls["split-weight reference"] = lambda inputs, weight, bias: concat_conv2d(inputs, weight, bias, 1, "relu",
                                                                                 backend="reference")
    return impls


def bench_nodes(nodes: Sequence[NodeShape], dtype: torch.dtype, device: torch.device, timing: Timing,
                progress: Progress) -> list[Row]:
    rows = []
    for node in nodes:
        generator = torch.Generator(device="cpu").manual_seed(0)
        inputs = [torch.randn(node.batch, c, node.height, node.width, generator=generator).to(device, dtype)
                  .contiguous(memory_format=torch.channels_last).requires_grad_() for c in node.inputs]
        weight = (torch.randn(node.out_channels, sum(node.inputs), 3, 3, generator=generator) * 0.05).to(
            device, dtype).requires_grad_()
        bias = torch.randn(node.out_channels, generator=generator).to(device, dtype).requires_grad_()
        grad = torch.randn(node.batch, node.out_channels, node.height, node.width, generator=generator).to(
            device, dtype).contiguous(memory_format=torch.channels_last)
        flops = node.forward_flops()
        for name, impl in _node_impls(device).items():
            for pass_, work in (("forward", flops), ("forward+backward", 3 * flops)):
                progress.start(f"concat_conv2d {node.label} {name} {pass_}")
                row = Row("concat_conv2d node", node.label, str(dtype).removeprefix("torch."), name, pass_)
                if isinstance(impl, str):
                    row.status, row.note = "unavailable", impl
                else:
                    fn = _step(functools.partial(impl, inputs, weight, bias), [*inputs, weight, bias],
                               grad if pass_ != "forward" else None)
                    _timed(row, fn, device, timing)
                    if row.ms:
                        row.tflops = work / (row.ms * 1e-3) / 1e12
                rows.append(row)
                progress.advance()
    _add_speedups(rows, "torch.cat + conv2d")
    return rows


def _step(forward: Callable[[], object], wrt: Sequence[torch.Tensor], grads) -> Callable[[], object]:
    """The timed work: ``forward()`` alone without an autograd graph when ``grads`` is None, else ``forward()`` and
    the gradients of ``wrt`` under the upstream gradients ``grads``."""
    if grads is None:
        def forward_only():
            with torch.no_grad():
                return forward()
        return forward_only
    return lambda: torch.autograd.grad(forward(), wrt, grads)


class _CatConv(nn.Module):
    """The eager baseline of a ConcatConv2d: torch.cat, then nn.Conv2d (same weight and bias), then the activation."""

    def __init__(self, fused: ConcatConv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(sum(fused.in_channels), fused.out_channels, fused.kernel_size, padding=fused.padding,
                              bias=fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(fused.weight)
            if fused.bias is not None:
                self.conv.bias.copy_(fused.bias)
        self.relu = fused.activation == "relu"

    def forward(self, *inputs):
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        out = self.conv(torch.cat(inputs, 1))
        return F.relu(out) if self.relu else out


def cat_conv_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ConcatConv2d replaced by torch.cat + nn.Conv2d holding the same parameters."""
    import copy

    baseline = copy.deepcopy(model)
    for module in list(baseline.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ConcatConv2d):
                setattr(module, child_name, _CatConv(child))
    return baseline


def bench_lfn_step(batch: int, size: int, dtype: torch.dtype, device: torch.device, timing: Timing,
                   progress: Progress) -> list[Row]:
    from torch_medloss.models import LatticeFusionNet

    rows = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    clean = torch.rand(batch, 1, size, size, generator=generator).to(device)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=generator).to(device))
    clean, noisy = (t.contiguous(memory_format=torch.channels_last) for t in (clean, noisy))
    torch.manual_seed(0)
    fused = LatticeFusionNet().to(device, memory_format=torch.channels_last)
    variants = {"LatticeFusionNet on ConcatConv2d": fused, "same network on torch.cat + nn.Conv2d":
                cat_conv_copy(fused)}
    label = f"B{batch} 1x{size}x{size}, {sum(p.numel() for p in fused.parameters())} parameters"
    autocast = dtype in (torch.bfloat16, torch.float16)
    for name, model in variants.items():
        progress.start(f"LFN training step {name}")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                loss = F.mse_loss(model(noisy).float(), clean)
            loss.backward()
            optimizer.step()

        row = Row("LFN training step", label, f"autocast {str(dtype).removeprefix('torch.')}" if autocast else
                  str(dtype).removeprefix("torch."), name, "forward+backward+Adam")
        if name.startswith("LatticeFusionNet") and _fused_reason(device):
            row.note = f"ConcatConv2d runs its reference here: {_fused_reason(device)}"
        rows.append(_timed(row, step, device, timing))
        progress.advance()
    _add_speedups(rows, "same network on torch.cat + nn.Conv2d")
    return rows


# ---------------------------------------------------------------------------------------------- frequency split


def bench_split(images: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype], device: torch.device,
                timing: Timing, bandwidth: float | None, progress: Progress) -> list[Row]:
    rows = []
    reason = _fused_reason(device)
    impls = {"frequency_split (triton)": reason or "triton", "reference (pad + 2 conv2d + subtract)": "reference"}
    for shape in images:
        for dtype in dtypes:
            generator = torch.Generator(device="cpu").manual_seed(0)
            x = torch.rand(shape, generator=generator).to(device, dtype).requires_grad_()
            grads = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2)]
            label = f"B{shape[0]} C{shape[1]} {shape[2]}x{shape[3]}, sigma {SPLIT_SIGMA:g}"
            moved = 3 * x.numel() * x.element_size()  # one read of x, two writes
            for name, backend in impls.items():
                for pass_ in ("forward", "forward+backward"):
                    progress.start(f"frequency_split {label} {name} {pass_}")
                    row = Row("frequency_split", label, str(dtype).removeprefix("torch."), name, pass_)
                    if backend not in ("triton", "reference"):
                        row.status, row.note = "unavailable", backend
                    else:
                        forward = functools.partial(frequency_split, x, SPLIT_SIGMA, backend=backend)
                        _timed(row, _step(forward, x, grads if pass_ != "forward" else None), device, timing)
                        if row.ms and bandwidth and pass_ == "forward":
                            row.bandwidth_fraction = moved / (row.ms * 1e-3) / bandwidth
                    rows.append(row)
                    progress.advance()
    _add_speedups(rows, "reference (pad + 2 conv2d + subtract)")
    return rows


# -------------------------------------------------------------------------------------------------------- report


def _add_speedups(rows: Sequence[Row], baseline: str) -> None:
    times = {(r.workload, r.dtype, r.pass_): r.ms for r in rows if r.implementation == baseline and r.ms}
    for r in rows:
        base = times.get((r.workload, r.dtype, r.pass_))
        r.speedup = base / r.ms if base and r.ms else None


def markdown(rows: Sequence[Row], env: dict, bandwidth: float | None) -> str:
    copy = f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "not measured (CPU)"
    lines = [f"torch_medloss bench --ops on {env['device_name']} ({env['device'].upper()}, {env['threads']} threads), "
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}.",
             "Median time in ms. Speedup = the baseline's time / this time, for the same workload, dtype and pass; "
             "baselines: torch.cat + conv2d (node), the torch.cat + nn.Conv2d network (LFN step), the reference "
             f"(frequency_split). Device copy bandwidth: {copy}."]
    for op in dict.fromkeys(r.op for r in rows):
        columns = ["workload", "dtype", "implementation", "pass", "ms", "speedup", "TFLOP/s", "of copy bandwidth",
                   "note"]
        lines += ["", f"### {op}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in (r for r in rows if r.op == op):
            cells = [r.workload, r.dtype, r.implementation, r.pass_,
                     "-" if r.ms is None else f"{r.ms:.3f}" if r.ms < 1 else f"{r.ms:.2f}",
                     "-" if r.speedup is None else f"{r.speedup:.2f}x",
                     "-" if r.tflops is None else f"{r.tflops:.3g}",
                     "-" if r.bandwidth_fraction is None else f"{100 * r.bandwidth_fraction:.0f}%", r.note]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(device: torch.device, quick: bool, timing: Timing, progress: bool = True,
        json_path: str | None = None) -> tuple[list[Row], str]:
    """Run every op workload for ``device``; returns the rows and the markdown (also written as JSON if asked)."""
    gpu = device.type == "cuda"
    nodes = QUICK_NODES if quick else GPU_NODES if gpu else CPU_NODES
    images = QUICK_IMAGES if quick else GPU_IMAGES if gpu else CPU_IMAGES
    node_dtype = torch.bfloat16 if gpu else torch.float32
    split_dtypes = (torch.float32, torch.bfloat16) if gpu else (torch.float32,)
    lfn = (2, 32) if quick else (16, 128) if gpu else (4, 64)
    total = len(nodes) * 6 + 2 + len(images) * len(split_dtypes) * 4
    bar = Progress(total, enabled=progress)
    bandwidth = copy_bandwidth(device, timing)
    try:
        rows = bench_nodes(nodes, node_dtype, device, timing, bar)
        rows += bench_lfn_step(*lfn, node_dtype, device, timing, bar)
        rows += bench_split(images, split_dtypes, device, timing, bandwidth, bar)
    finally:
        bar.close()
    env = report.environment(device)
    text = markdown(rows, env, bandwidth)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"environment": env, "copy_bandwidth_bytes_per_s": bandwidth,
                       "rows": [dataclasses.asdict(r) for r in rows]}, handle, indent=1)
    return rows, text

