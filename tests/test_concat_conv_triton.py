"""Tests of the Triton concat_conv2d kernels (kernels/concat_conv.py) against torch_medloss.reference.concat_conv.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is imported,
and setting it here would change how every later test module sees triton). Each subprocess runs many tiny cases
(one interpreter start-up costs seconds) and collects every mismatch before failing, printing the differing values.
Under the interpreter ``tl.dot`` is numpy's fp32 matmul (it ignores input_precision), so fp32 compares with the
float64 truth at 1e-5; bf16 and fp16 must stay within a small multiple of PyTorch's own error at that dtype. A few
cases shrink the block sizes so that every dimension has several tiles and the weight gradient several splits.
torch.compile cannot trace the interpreted kernels (the interpreter runs them eagerly, also on fake tensors), so
on CPU opcheck runs only its schema and autograd-registration checks; the CUDA tests at the end run the full
opcheck, a torch.compile(fullgraph=True) smoke test and realistic shapes.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

import helpers

REPO = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_KERNELS = importlib.util.find_spec("torch_medloss.kernels") is not None
TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON and HAS_KERNELS),
                          reason="needs a CUDA device, triton and the installed torch_medloss.kernels")

# Shared by the subprocess scripts: the kernel module (from the installed package, else straight from kernels/ in
# this checkout, mounted as torch_medloss.kernels so that the public function's "triton" backend finds it), the case
# builder and the comparisons that record failures instead of stopping at the first.
PRELUDE = """
import warnings

import torch.nn.functional as F

from torch_medloss.functional.concat_conv import concat_conv2d
from torch_medloss.ops import concat_conv as op
from torch_medloss.reference.concat_conv import concat_conv2d as reference

kernel = load_kernel("concat_conv")
op._triton_ops()  # the autograd of the Triton ops
FP32 = dict(rtol=1e-5, atol=1e-5)


def compare(name, got, expected, rtol, atol):
    try:
        torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol)
    except AssertionError as error:
        worst = (got.double() - expected.double()).abs().flatten().argmax()
        FAILURES.append(
            f"{name}: {error}\\n  got      {got.flatten()[:8].tolist()} (worst {got.flatten()[worst].item()})"
            f"\\n  expected {expected.flatten()[:8].tolist()} (worst {expected.flatten()[worst].item()})"
        )


def make(channels, out_channels, ks, batch, height, width, bias, layout, dtype, generator):
    # Values on a coarse grid would hide rounding; plain normals. layout: "nchw", "nhwc" or "view" (a channel and
    # column slice of a bigger tensor: no dense layout at all).
    inputs = []
    for c in channels:
        x = torch.randn(batch, c, height, width, generator=generator)
        if layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "view":
            x = torch.randn(batch, c + 2, height, 2 * width, generator=generator)[:, 1:c + 1, :, ::2]
        inputs.append(x.to(dtype))
    weight = (torch.randn(out_channels, sum(channels), ks, ks, generator=generator) / (sum(channels) * ks)).to(dtype)
    b = torch.randn(out_channels, generator=generator).to(dtype) if bias else None
    return inputs, weight, b


def run(fn, inputs, weight, bias, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs] + [weight.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    n = len(inputs)
    out = fn(leaves[:n], leaves[n], leaves[n + 1] if bias is not None else None)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads, leaves


def check(name, channels, out_channels, ks, padding, batch, height, width, bias, relu, layout, dtype, generator):
    inputs, weight, b = make(channels, out_channels, ks, batch, height, width, bias, layout, dtype, generator)
    out_shape = (batch, out_channels, height + 2 * padding - ks + 1, width + 2 * padding - ks + 1)
    grad_out = torch.randn(out_shape, generator=generator).to(dtype)

    def triton_fn(xs, w, bb):
        return kernel.concat_conv2d_triton(xs, w, bb, padding, relu)

    def ref_fn(xs, w, bb):
        return reference(xs, w, bb, padding, relu)

    out, grads, leaves = run(triton_fn, inputs, weight, b, grad_out)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth, truth_grads, _ = run(ref_fn, [x.double() for x in inputs], weight.double(), as64(b), grad_out.double())
    names = [f"grad x{i}" for i in range(len(inputs))] + ["grad weight"] + (["grad bias"] if bias else [])
    if out.dtype != dtype or out.shape != out_shape:
        FAILURES.append(f"{name}: out {out.dtype} {tuple(out.shape)}, expected {dtype} {out_shape}")
        return
    # A 1-channel input (or a 1x1 image) is both layouts at once and does not decide; any other "nhwc" input does.
    decides = layout == "nhwc" and max(channels) > 1 and height * width > 1
    expected_layout = torch.channels_last if decides else torch.contiguous_format
    if not out.is_contiguous(memory_format=expected_layout):
        FAILURES.append(f"{name}: out strides {out.stride()} are not {expected_layout}")
    for g, x in zip(grads, leaves, strict=True):
        if g.shape != x.shape or g.dtype != x.dtype:
            FAILURES.append(f"{name}: a gradient is {g.dtype} {tuple(g.shape)}, its leaf {x.dtype} {tuple(x.shape)}")
    if dtype == torch.float32:
        compare(f"{name} out", out, truth, **FP32)
        for label, g, e in zip(names, grads, truth_grads, strict=True):
            compare(f"{name} {label}", g, e, **FP32)
        return
    # bf16 / fp16: PyTorch's own error at this dtype (the reference run in that dtype) bounds ours, times 2, plus a
    # floor of one rounding step of the largest magnitude (a ReLU kink can flip a value's mask).
    low, low_grads, _ = run(ref_fn, inputs, weight, b, grad_out)
    eps = torch.finfo(dtype).eps
    for label, g, e, t in zip(["out"] + names, [out, *grads], [low, *low_grads], [truth, *truth_grads], strict=True):
        torch_error = (e.double() - t).abs().max().item()
        our_error = (g.double() - t).abs().max().item()
        floor = 2 * eps * t.abs().max().item() + 1e-6
        if our_error > 2 * torch_error + floor:
            FAILURES.append(f"{name} {label}: error {our_error:.3g} > 2 x torch's {torch_error:.3g} + {floor:.3g}")
    return out, grads

"""


def run_script(body: str, interpret: bool = True) -> subprocess.CompletedProcess:
    """helpers.run_script with this file's PRELUDE: a fresh interpreter, under TRITON_INTERPRET=1 or not."""
    return helpers.run_script(PRELUDE, body, interpret)


@TRITON
def test_triton_interpreted_output_layout_from_all_inputs():
    """The Triton op allocates its output in the reference's output_memory_format: a 1-channel channels_last first
    input no longer makes a channels_last network's output NCHW; the values and every gradient match the float64
    reference."""
    run_script(
        """
        from torch_medloss.reference.concat_conv import output_memory_format

        generator = torch.Generator().manual_seed(4)
        cl, nchw = torch.channels_last, torch.contiguous_format

        def laid_out(kind, channels):
            x = torch.randn(2, channels, 5, 4, generator=generator)
            if kind == "nhwc":  # dense channels_last strides, also for 1 channel
                return torch.empty_like(x, memory_format=cl).copy_(x)
            if kind == "nhwc1":  # .to(channels_last) keeps a 1-channel tensor's NCHW strides
                return x.to(memory_format=cl)
            if kind == "view":
                return torch.randn(2, channels + 2, 5, 8, generator=generator)[:, 1:channels + 1, :, ::2]
            return x

        for layouts, expected in [
            ((("nhwc", 1), ("nhwc", 4)), cl), ((("nhwc1", 1), ("nhwc", 3), ("nchw", 2)), cl),
            ((("view", 3), ("nhwc", 2)), cl), ((("nchw", 1), ("nchw", 3), ("nhwc", 2)), nchw),
            ((("nhwc", 2), ("nchw", 3)), cl), ((("nchw", 2), ("nhwc", 3)), nchw), ((("nhwc", 1), ("nhwc1", 1)), nchw),
        ]:
            name = "-".join(f"{k}{c}" for k, c in layouts)
            inputs = [laid_out(kind, c) for kind, c in layouts]
            weight = torch.randn(3, sum(c for _, c in layouts), 3, 3, generator=generator) / 9
            bias = torch.randn(3, generator=generator)
            grad_out = torch.randn(2, 3, 5, 4, generator=generator)
            if output_memory_format(inputs) != expected:
                FAILURES.append(f"{name}: output_memory_format {output_memory_format(inputs)}, expected {expected}")
            results = []
            for fn, cast in ((lambda xs, w, b: kernel.concat_conv2d_triton(xs, w, b, 1, True), torch.float32),
                             (lambda xs, w, b: concat_conv2d(xs, w, b, 1, "relu", backend="triton"), torch.float32),
                             (lambda xs, w, b: reference(xs, w, b, 1, True), torch.float64)):
                leaves = [t.detach().to(cast).requires_grad_() for t in (*inputs, weight, bias)]
                out = fn(leaves[:-2], leaves[-2], leaves[-1])
                # (the float64 copies of the reference's leaves are dense: its layout is test_concat_conv.py's)
                if cast == torch.float32 and not out.is_contiguous(memory_format=expected):
                    FAILURES.append(f"{name}: out strides {out.stride()} are not {expected}")
                results.append((out, torch.autograd.grad(out, leaves, grad_out.to(cast))))
            truth, truth_grads = results[-1]
            for out, grads in results[:-1]:
                compare(f"{name} out", out, truth, **FP32)
                for i, (g, e) in enumerate(zip(grads, truth_grads, strict=True)):
                    compare(f"{name} grad {i}", g, e, **FP32)
        """
    )


@TRITON
def test_triton_interpreted_relu_keeps_nan():
    """ReLU after the bias keeps a NaN as torch.relu does (the kernel asks tl.maximum to propagate it: PTX max.f32
    alone would return 0), and a NaN input reaches exactly the outputs whose 3x3 window covers it."""
    run_script(
        """
        x = [torch.randn(1, 2, 5, 6), torch.randn(1, 3, 5, 6)]
        x[1][0, 1, 2, 3] = float("nan")
        weight, bias = torch.randn(4, 5, 3, 3), torch.randn(4)
        got = kernel.concat_conv2d_triton(x, weight, bias, 1, True)
        expected = torch.relu(torch.nn.functional.conv2d(torch.cat(x, 1), weight, bias, padding=1))
        if not torch.equal(got.isnan(), expected.isnan()) or not got.isnan().any():
            FAILURES.append(f"NaN pattern differs: got {got.isnan().sum()} NaNs, expected {expected.isnan().sum()}")
        """
    )


# ------------------------------------------------------------------------------- compiled for sm_90, CPU


@TRITON
def test_triton_compiles_for_sm90_without_spills():
    """Compile the three kernels ahead of time for an H100 (sm_90a) at the launchers' sizes; no GPU needed.

    The interpreter is lax about types; the compiler is not. ptxas must report no register spills for bf16 and fp32
    (2 and 8 inputs) and fp32 (3 inputs) with 3x3 kernels, with and without ReLU.
    """
    run_script(
        """
        for dtype, precision, num_inputs, relu in (("bf16", "ieee", 2, True), ("bf16", "ieee", 8, False),
                                                   ("fp32", "tf32", 3, True)):
            data = {name: f"*{dtype}" for name in (
                [f"x{k}_ptr" for k in range(8)] + [f"gx{k}_ptr" for k in range(8)]
                + ["out_ptr", "w_ptr", "bias_ptr", "gy_ptr", "y_ptr"])}
            common = dict(NUM_INPUTS=num_inputs, KS=3, RELU=relu, UPCAST=False, INPUT_PRECISION=precision)
            for fn, blocks in (
                (kernel._concat_conv2d_fwd_kernel, dict(HAS_BIAS=True, BLOCK_M=kernel._FWD_BLOCK_M,
                                                        BLOCK_N=kernel._FWD_BLOCK_N, BLOCK_K=kernel._FWD_BLOCK_K)),
                (kernel._concat_conv2d_bwd_input_kernel, dict(BLOCK_M=kernel._BWD_IN_BLOCK_M,
                                                              BLOCK_N=kernel._BWD_IN_BLOCK_N,
                                                              BLOCK_K=kernel._BWD_IN_BLOCK_K)),
                (kernel._concat_conv2d_bwd_weight_kernel, dict(BLOCK_C=kernel._BWD_W_BLOCK_C,
                                                               BLOCK_O=kernel._BWD_W_BLOCK_O,
                                                               BLOCK_P=kernel._BWD_W_BLOCK_P)),
            ):
                registers, spills = ptxas_report(fn, data, {**common, **blocks}, kernel._NUM_WARPS,
                                                 kernel._NUM_STAGES)
                print(fn.__name__, dtype, num_inputs, registers, spills)
                if spills:
                    FAILURES.append(f"{fn.__name__} {dtype} {num_inputs} inputs: {registers} registers, "
                                    f"{spills} bytes of spill stores")
        """,
        interpret=False,
    )


# ---------------------------------------------------------------------------------------- interpreted, CPU


@TRITON
def test_triton_interpreted_option_grid():
    """1 to 8 inputs; 1x1 and 3x3; padding 0, 1, 2; bias and ReLU on/off; NCHW, NHWC and strided views; fp32, bf16
    and fp16; odd and size-1 sizes. The options cycle so that each value meets many others."""
    run_script(
        """
        generator = torch.Generator().manual_seed(0)
        channels_list = [(3,), (1, 2), (5, 3, 2), (2, 7, 1, 3), (4, 4, 4, 4, 1), (1, 1, 3, 1, 2, 5),
                         (2, 3, 1, 1, 2, 3, 1), (1, 2, 3, 1, 2, 1, 3, 2), (12,), (6, 6)]
        layouts = ["nchw", "nhwc", "view"]
        dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
        sizes = [(2, 5, 7), (1, 9, 4), (2, 1, 6), (1, 6, 1), (2, 3, 3)]
        count = 0
        for i, channels in enumerate(channels_list):
            for ks, padding in ((3, 1), (1, 0), (3, 2 * (i % 2))):
                j = i + ks + padding
                batch, height, width = sizes[j % len(sizes)]
                if height + 2 * padding < ks or width + 2 * padding < ks:
                    height, width = height + 2, width + 2
                bias, relu = (j % 2 == 0), (j % 3 != 1)
                layout, dtype = layouts[j % 3], dtypes[(i + padding) % len(dtypes)]
                out_channels = (5, 3, 1, 12, 7)[j % 5]
                name = (f"C={channels} O={out_channels} k={ks} p={padding} {batch}x{height}x{width} bias={bias} "
                        f"relu={relu} {layout} {dtype}")
                check(name, channels, out_channels, ks, padding, batch, height, width, bias, relu, layout, dtype,
                      generator)
                count += 1
        print(count, "cases")
        """
    )


@TRITON
def test_triton_interpreted_tiles_splits_determinism_and_front_end():
    run_script(
        """
        generator = torch.Generator().manual_seed(1)

        # 1. Small blocks: several pixel tiles, output-channel tiles, channel tiles per input (and tiles past a short
        #    input's channel count), reduction steps, and weight-gradient splits (with a partial last split).
        kernel._FWD_BLOCK_M = kernel._FWD_BLOCK_N = kernel._FWD_BLOCK_K = 16
        kernel._BWD_IN_BLOCK_M = kernel._BWD_IN_BLOCK_N = kernel._BWD_IN_BLOCK_K = 16
        kernel._BWD_W_BLOCK_C = kernel._BWD_W_BLOCK_O = kernel._BWD_W_BLOCK_P = 16
        kernel._BWD_W_TARGET_PROGRAMS = 150
        for ks, padding, layout, dtype in ((3, 1, "nhwc", torch.float32), (1, 0, "nchw", torch.bfloat16)):
            check(f"small blocks k={ks} {layout} {dtype}", (20, 3), 17, ks, padding, 2, 9, 7, True, True, layout,
                  dtype, generator)
        # programs per split: 2 out tiles x 9 taps x 2 inputs x 2 channel tiles per input
        splits, per_split = kernel._splits(2 * 9 * 2 * 2, 2 * 9 * 7)
        if not (splits > 1 and splits * per_split >= 2 * 9 * 7 and (splits - 1) * per_split < 2 * 9 * 7):
            FAILURES.append(f"weight-gradient splits {splits} x {per_split} do not cover 126 pixels in several")

        # 2. Bitwise run-to-run determinism (forward and every gradient), with the small blocks.
        inputs, weight, b = make((5, 18), 17, 3, 2, 5, 6, True, "nhwc", torch.float32, generator)
        grad_out = torch.randn(2, 17, 5, 6, generator=generator).to(memory_format=torch.channels_last)
        fn = lambda xs, w, bb: kernel.concat_conv2d_triton(xs, w, bb, 1, True)  # noqa: E731
        first_out, first_grads, _ = run(fn, inputs, weight, b, grad_out)
        again_out, again_grads, _ = run(fn, inputs, weight, b, grad_out)
        if not (torch.equal(first_out, again_out) and all(map(torch.equal, first_grads, again_grads))):
            FAILURES.append("two runs differ")
        # 3. The upstream gradient scaled by 2 scales every gradient by 2, exactly (fp32, no rounding to subnormals).
        _, twice, _ = run(fn, inputs, weight, b, 2 * grad_out)
        for i, (g, g2) in enumerate(zip(first_grads, twice, strict=True)):
            if not torch.equal(g2, 2 * g):
                FAILURES.append(f"gradient {i} does not scale exactly with the upstream gradient")

        # 4. Only some leaves need a gradient; an expanded (stride-0) upstream gradient from .sum().
        xs = [x.clone().requires_grad_(i == 1) for i, x in enumerate(inputs)]
        w = weight.clone()
        out = kernel.concat_conv2d_triton(xs, w, None, 1, False)
        out.sum().backward()
        x64 = [x.double().requires_grad_() for x in inputs]
        reference(x64, weight.double(), None, 1, False).sum().backward()
        if xs[0].grad is not None or w.grad is not None:
            FAILURES.append("a leaf that does not require grad got one")
        compare("partial needs grad x1", xs[1].grad, x64[1].grad, **FP32)

        # 5. The public function and the module on the triton backend.
        inputs, weight, b = make((3, 4), 5, 3, 2, 6, 5, True, "nhwc", torch.float32, generator)
        got = concat_conv2d(inputs, weight, b, 1, "relu", backend="triton")
        compare("concat_conv2d triton", got, reference(inputs, weight, b, 1, True), **FP32)
        module = torch_medloss.nn.ConcatConv2d([3, 4], 5, backend="triton")
        module_ref = torch_medloss.nn.ConcatConv2d([3, 4], 5, backend="reference")
        module_ref.load_state_dict(module.state_dict())
        compare("ConcatConv2d triton", module(*inputs), module_ref(*inputs), **FP32)
        module(*inputs).square().sum().backward()
        module_ref(*inputs).square().sum().backward()
        compare("ConcatConv2d triton grad weight", module.weight.grad, module_ref.weight.grad, **FP32)
        compare("ConcatConv2d triton grad bias", module.bias.grad, module_ref.bias.grad, **FP32)

        # 6. float64: where "auto" would run Triton (as on a GPU: Triton first in the CPU order here), it warns once
        #    and runs the reference; a named "triton" raises; so does the op itself.
        from torch_medloss import _backend
        doubles = [x.double() for x in inputs]
        cpu_order = _backend._AUTO_ORDER["cpu"]
        _backend._AUTO_ORDER["cpu"] = ("triton", *cpu_order)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = concat_conv2d(doubles, weight.double(), b.double())
            concat_conv2d(doubles, weight.double(), b.double())
        _backend._AUTO_ORDER["cpu"] = cpu_order
        if len(caught) != 1 or "float64" not in str(caught[0].message):
            FAILURES.append(f"float64 auto: expected one warning on float64, got {[str(w.message) for w in caught]}")
        compare("float64 auto", got, reference(doubles, weight.double(), b.double(), 1, False), rtol=1e-12, atol=1e-12)
        for call, pattern in ((lambda: concat_conv2d(doubles, weight.double(), b.double(), backend="triton"),
                               "backend='triton' cannot run concat_conv2d: .*not float64"),
                              (lambda: kernel.concat_conv2d_triton(doubles, weight.double(), None, 1, False),
                               "take float32, bfloat16 or float16, got torch.float64")):
            try:
                call()
                FAILURES.append(f"no error for {pattern}")
            except ValueError as error:
                import re
                if not re.search(pattern, str(error)):
                    FAILURES.append(f"wrong error {error!r}, expected {pattern}")

        # 7. Double backward is refused with a clear error.
        xs = [x.clone().requires_grad_() for x in inputs]
        out = kernel.concat_conv2d_triton(xs, weight, b, 1, True)
        (grad,) = torch.autograd.grad(out.sum(), xs[0], create_graph=True)
        try:
            grad.sum().backward()
            FAILURES.append("double backward did not raise")
        except RuntimeError as error:
            if "does not support double backward" not in str(error):
                FAILURES.append(f"double backward: wrong error {error!r}")

        # 8. The schemas and the autograd registration (the fake-tensor checks need a real device: under the
        #    interpreter the kernels would run on fake tensors; the CUDA test runs the full opcheck).
        args = ([torch.randn(1, 2, 4, 5), torch.randn(1, 3, 4, 5)], torch.randn(4, 5, 3, 3), torch.randn(4), 1, True)
        torch.library.opcheck(torch.ops.torch_medloss.concat_conv2d_triton.default, args,
                              test_utils=("test_schema", "test_autograd_registration"))
        out = kernel.concat_conv2d_triton(*args)
        bwd_args = (torch.randn_like(out), out, args[0], args[1], 1, True)
        torch.library.opcheck(torch.ops.torch_medloss.concat_conv2d_bwd_input_triton.default, bwd_args,
                              test_utils=("test_schema",))
        torch.library.opcheck(torch.ops.torch_medloss.concat_conv2d_bwd_weight_triton.default, bwd_args,
                              test_utils=("test_schema",))
        """
    )


# ---------------------------------------------------------------------------------------------------- CUDA

# Realistic Lattice Fusion Network node shapes (the bench's), smaller batches to keep the test quick.
CUDA_SHAPES = [
    ((64, 64), 64, 3, 1, 4, 128, 128),
    ((64, 64, 64), 64, 3, 1, 2, 128, 128),
    ((32, 32, 32, 32), 64, 3, 1, 2, 256, 256),
    ((17, 40, 3), 24, 1, 0, 3, 37, 53),
]


def _cuda_case(channels, out_channels, ks, batch, height, width, dtype, channels_last, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    inputs = [torch.randn(batch, c, height, width, device="cuda", generator=generator, dtype=dtype)
              for c in channels]
    if channels_last:
        inputs = [x.to(memory_format=torch.channels_last) for x in inputs]
    fan_in = sum(channels) * ks * ks
    weight = (torch.randn(out_channels, sum(channels), ks, ks, device="cuda", generator=generator) / fan_in ** 0.5)
    bias = torch.randn(out_channels, device="cuda", generator=generator)
    return inputs, weight.to(dtype), bias.to(dtype)


def _forward_backward(fn, inputs, weight, bias, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    leaves += [weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    out = fn(leaves[:-2], leaves[-2], leaves[-1])
    return out, torch.autograd.grad(out, leaves, grad_out)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{len(s[0])}x{s[0][0]}-{s[1]}-k{s[2]}-{s[5]}")
def test_cuda_triton_matches_reference(shape, dtype):
    """Forward and every gradient on a GPU against the reference in float64, channels_last and NCHW.

    fp32 runs in TF32 (cuDNN's default): the tolerance is 5e-3 of each tensor's largest magnitude. bf16 must stay
    within 2x the error of PyTorch's own bf16 convolution (cuDNN) plus two bf16 rounding steps.
    """
    from torch_medloss.ops.concat_conv import _triton_ops
    from torch_medloss.reference.concat_conv import concat_conv2d as reference

    concat_conv2d_triton = _triton_ops().concat_conv2d_triton

    channels, out_channels, ks, padding, batch, height, width = shape
    for channels_last in (True, False):
        inputs, weight, bias = _cuda_case(channels, out_channels, ks, batch, height, width, dtype, channels_last)
        out_shape = (batch, out_channels, height + 2 * padding - ks + 1, width + 2 * padding - ks + 1)
        grad_out = torch.randn(out_shape, device="cuda", dtype=dtype)
        got, grads = _forward_backward(lambda xs, w, b: concat_conv2d_triton(xs, w, b, padding, True), inputs, weight,
                                       bias, grad_out)
        ref = lambda xs, w, b: reference(xs, w, b, padding, True)  # noqa: E731
        truth, truth_grads = _forward_backward(ref, [x.double() for x in inputs], weight.double(), bias.double(),
                                               grad_out.double())
        low, low_grads = _forward_backward(ref, inputs, weight, bias, grad_out)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for i, (g, t, lo) in enumerate(zip([got, *grads], [truth, *truth_grads], [low, *low_grads], strict=True)):
            error = (g.double() - t).abs().max().item()
            scale = t.abs().max().item()
            if dtype == torch.float32:
                assert error <= 5e-3 * scale + 1e-5, (i, channels_last, error, scale)
            else:
                torch_error = (lo.double() - t).abs().max().item()
                bound = 2 * torch_error + 2 * torch.finfo(dtype).eps * scale
                assert error <= bound, (i, channels_last, error, torch_error, scale)


@CUDA
def test_cuda_triton_deterministic_opcheck_and_compile():
    from torch_medloss.functional.concat_conv import concat_conv2d
    from torch_medloss.ops.concat_conv import _triton_ops

    concat_conv2d_triton = _triton_ops().concat_conv2d_triton

    inputs, weight, bias = _cuda_case((24, 40), 32, 3, 2, 33, 47, torch.bfloat16, True, seed=1)
    grad_out = torch.randn(2, 32, 33, 47, device="cuda", dtype=torch.bfloat16)
    fn = lambda xs, w, b: concat_conv2d_triton(xs, w, b, 1, True)  # noqa: E731
    first, first_grads = _forward_backward(fn, inputs, weight, bias, grad_out)
    again, again_grads = _forward_backward(fn, inputs, weight, bias, grad_out)
    assert torch.equal(first, again) and all(map(torch.equal, first_grads, again_grads))

    small = ([x[:1, :, :9, :9].detach() for x in inputs], weight.detach(), bias.detach())
    torch.library.opcheck(torch.ops.torch_medloss.concat_conv2d_triton.default, (*small, 1, True))
    torch.library.opcheck(torch.ops.torch_medloss.concat_conv2d_triton.default, (*small[:2], None, 1, False))

    compiled = torch.compile(lambda a, b, w, bb: concat_conv2d([a, b], w, bb, 1, "relu", backend="triton"),
                             fullgraph=True)
    a, b = (x.detach().requires_grad_() for x in inputs)
    out = compiled(a, b, weight, bias)
    torch.testing.assert_close(out, first)
    out.backward(grad_out)
    torch.testing.assert_close(a.grad, first_grads[0])
