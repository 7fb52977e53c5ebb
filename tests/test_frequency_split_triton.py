"""Tests of the Triton frequency_split kernels (kernels/frequency_split.py) against the reference.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess: the variable must be set before triton is imported,
and setting it here would change how every later test module sees triton. Each subprocess runs many cases (one
interpreter start-up costs seconds) and collects every mismatch before failing, printing the differing values.
The shapes are tiny; some cases shrink the window (kernel._TILE) so that an image has several windows per axis, and
the programs target (kernel._TARGET_PROGRAMS) so that a program walks several planes. The CUDA tests at the end run
the compiled kernels on 512^2 images.

Tolerances: float32 values and gradients within 2e-5 (absolute and relative; the images are O(1), the error is a
few float32 ulps from a different summation order); bfloat16 and float16 within one ulp of the output (eps
relative), since both sides round an fp32 result once and may fall on either side of a rounding boundary;
``high == x - low`` is always checked bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

import helpers

REPO = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Shared by the subprocess scripts and the CUDA tests: the kernel module (from the installed package, else straight
# from kernels/ in this checkout, registered as the package torch_medloss.kernels so that the front end finds it
# too), the comparisons that record failures instead of stopping at the first, and one full check of a case.
PRELUDE = """
from torch_medloss.functional.frequency_split import frequency_split
from torch_medloss.ops import frequency_split as op
from torch_medloss.reference.frequency_split import frequency_split as reference_split

kernel = load_kernel("frequency_split")
op._triton_ops()  # the autograd of the Triton ops
FP32 = dict(rtol=2e-5, atol=2e-5)


def tolerance(dtype):
    if dtype == torch.float32:
        return FP32
    return dict(rtol=torch.finfo(dtype).eps, atol=1e-5)


def compare(name, got, expected, rtol, atol):
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, check_dtype=True)
    except AssertionError as error:
        worst = (got.double() - expected.double()).abs().flatten().argmax()
        FAILURES.append(
            f"{name}: {error}\\n  got      {got.flatten()[:8].tolist()} (worst {got.flatten()[worst].item()})"
            f"\\n  expected {expected.flatten()[:8].tolist()} (worst {expected.flatten()[worst].item()})"
        )


def exact(name, got, expected):
    if got.dtype != expected.dtype or not torch.equal(got, expected):
        diff = (got.double() - expected.double()).abs()
        FAILURES.append(f"{name}: not bitwise equal ({got.dtype} vs {expected.dtype}), max diff {diff.max().item()}")


def make(shape, dtype, layout, generator, device="cpu"):
    x = (2 * torch.randn(shape, generator=generator) + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # H stride 1: a (B, C, W, H) tensor viewed transposed
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other row of a taller tensor, and a non-unit W stride
        tall = torch.zeros(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=dtype, device=device)
        tall[:, :, ::2, ::2] = x
        return tall[:, :, ::2, ::2]
    return x


def check(name, x, sigma, generator):
    # 1. values: low within the tolerance of the reference, high == x - low bit for bit, layout kept.
    tol = tolerance(x.dtype)
    leaf = x.detach().clone().requires_grad_()
    low, high = kernel.frequency_split_triton(leaf, sigma)
    expected_low, expected_high = reference_split(x, sigma)
    compare(f"{name} low", low, expected_low, **tol)
    exact(f"{name} high == x - low", high, x - low)
    if x.dtype == torch.float32:
        compare(f"{name} high", high, expected_high, **tol)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        if not low.is_contiguous(memory_format=torch.channels_last):
            FAILURES.append(f"{name}: low has strides {low.stride()}, x {x.stride()}")

    # 2. the gradient under random upstream gradients, against autograd of the reference: in float32 for float32,
    #    against the float64 reference for half precision (the reference's half-precision gradient rounds on the
    #    way; the kernel rounds once).
    grad_low = torch.randn(x.shape, generator=generator).to(x.dtype).to(x.device)
    grad_high = torch.randn(x.shape, generator=generator).to(x.dtype).to(x.device)
    (grad_x,) = torch.autograd.grad((low, high), leaf, (grad_low, grad_high))
    wide = torch.float32 if x.dtype == torch.float32 else torch.float64
    ref_leaf = x.detach().to(wide).requires_grad_()
    (expected_grad,) = torch.autograd.grad(reference_split(ref_leaf, sigma), ref_leaf,
                                           (grad_low.to(wide), grad_high.to(wide)))
    compare(f"{name} grad", grad_x, expected_grad.to(x.dtype), **tol)
    return low, high, grad_x

"""


def run_script(body: str, interpret: bool = True) -> subprocess.CompletedProcess:
    """helpers.run_script with this file's PRELUDE: a fresh interpreter, under TRITON_INTERPRET=1 or not."""
    return helpers.run_script(PRELUDE, body, interpret)


# ---------------------------------------------------------------------------------------- case grid, CPU


@TRITON
def test_interpreted_triton_case_grid():
    """Sizes from r + 1 to 40 (odd, prime, non-square), sigma 0.5 to 3, B <= 2, C <= 3, float32/bfloat16/float16,
    contiguous, channels_last, transposed and strided inputs; the default window, then windows of 16 (several per
    axis) with one and with several planes per program. (The default window, 32, is the paths test's.)"""
    run_script(
        """
        import itertools, math

        generator = torch.Generator().manual_seed(0)
        SIGMAS = [0.5, 0.8, 1.0, 1.7, 2.3, 3.0]
        LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]
        DTYPES = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
        count = 0
        for tile, target in [(64, 1024), (16, 1024), (16, 1)]:
            kernel._TILE, kernel._TARGET_PROGRAMS = tile, target
            for i, sigma in enumerate(SIGMAS):
                radius = math.ceil(3 * sigma)
                sizes = [(radius + 1, 2 * radius + 3), (17 + i, radius + 1), (37, 29 + 2 * i)]
                for j, (height, width) in enumerate(sizes):
                    k = i + j + tile
                    shape = (1 + k % 2, 1 + k % 3, height, width)
                    dtype = DTYPES[k % 4]
                    layout = LAYOUTS[(k // 2) % 4]
                    x = make(shape, dtype, layout, generator)
                    windows = [math.ceil(n / (kernel._side(n, radius) - 2 * radius)) for n in (height, width)]
                    name = f"tile={tile} target={target} sigma={sigma} {shape} {dtype} {layout} windows={windows}"
                    check(name, x, sigma, generator)
                    count += 1
        print("grid cases:", count)
        """
    )


# ------------------------------------------------------------------------- paths, front end, errors, CPU


@TRITON
def test_interpreted_paths_determinism_and_errors():
    """Several windows per axis with the default window size (32), sigma = 4 (r = 12), the window sizes and grids the
    heuristic gives, determinism, double backward, the front end, empty input, errors and opcheck."""
    run_script(
        """
        import math, warnings

        generator = torch.Generator().manual_seed(1)

        # 1. The default window (32) with several windows per axis, and r = 12 (sigma 4) at H = r + 1 and beyond.
        check("70x131 sigma=1", make((1, 2, 70, 131), torch.float32, "contiguous", generator), 1.0, generator)
        check("13x45 sigma=4", make((2, 1, 13, 45), torch.float32, "channels_last", generator), 4.0, generator)
        check("50x41 sigma=4 bf16", make((1, 1, 50, 41), torch.bfloat16, "contiguous", generator), 4.0, generator)

        # 2. The launch heuristic: windows of 32 up to r = 8, then next_power_of_2(4 r); never above what the image
        #    needs; the grid covers every pixel and every plane exactly once.
        for shape, radius, expected in [
            ((16, 3, 512, 512), 3, (32, 32, 8)), ((16, 3, 512, 512), 12, (64, 64, 16)),
            ((2, 1, 512, 300), 17, (128, 128, 16)), ((1, 1, 5, 7), 2, (16, 16, 4)), ((1, 1, 40, 33), 3, (32, 32, 8)),
        ]:
            tile_h, tile_w, warps, per_program, stride_h, stride_w, grid = kernel._launch_sizes(shape, radius)
            if (tile_h, tile_w, warps) != expected:
                FAILURES.append(f"launch sizes {shape} r={radius}: {(tile_h, tile_w, warps)} != {expected}")
            if not (stride_h == tile_h - 2 * radius and grid[1] * stride_h >= shape[2] > (grid[1] - 1) * stride_h
                    and grid[0] * stride_w >= shape[3] > (grid[0] - 1) * stride_w
                    and grid[2] * per_program >= shape[0] * shape[1] > (grid[2] - 1) * per_program):
                FAILURES.append(f"grid {grid} per_program={per_program} does not cover {shape} at r={radius}")
        print("B16 C3 512^2 sigma 1:", kernel._launch_sizes((16, 3, 512, 512), 3))

        # 3. Run to run: bitwise identical values and gradients (no atomics; fixed summation order).
        default_tile, kernel._TILE = kernel._TILE, 16
        x = make((2, 3, 23, 19), torch.float32, "contiguous", generator)
        first = check("determinism", x, 1.0, generator)
        again = check("determinism again", x, 1.0, torch.Generator().manual_seed(1))
        for a, b, what in zip(first[:2], again[:2], ("low", "high")):
            exact(f"determinism {what}", a, b)
        g1 = torch.Generator().manual_seed(5)
        second = check("determinism grad", x, 1.0, g1)
        third = check("determinism grad again", x, 1.0, torch.Generator().manual_seed(5))
        exact("determinism grad", second[2], third[2])
        kernel._TILE = default_tile

        # 4. Double backward: the backward op's own backward is the forward split; against the reference.
        x = make((1, 2, 11, 9), torch.float32, "contiguous", generator).requires_grad_()
        grads = [torch.randn(x.shape, generator=generator).requires_grad_() for _ in range(2)]
        v = torch.randn(x.shape, generator=generator)
        results = []
        for split in (kernel.frequency_split_triton, reference_split):
            (gx,) = torch.autograd.grad(split(x, 1.2), x, grads, create_graph=True)
            results.append(torch.autograd.grad(gx, grads, v))
        for got, expected, what in zip(results[0], results[1], ("grad_low", "grad_high")):
            compare(f"double backward {what}", got, expected, **FP32)

        # 5. The front end: backend="triton" runs the kernel; float64 and r > TRITON_MAX_RADIUS block it.
        x = make((2, 2, 12, 14), torch.float32, "contiguous", generator)
        low, high = frequency_split(x, 1.0, backend="triton")
        exact("front end low", low, kernel.frequency_split_triton(x, 1.0)[0])
        exact("front end high", high, x - low)
        try:
            frequency_split(x.double(), 1.0, backend="triton")
            FAILURES.append("float64 with backend='triton' did not raise")
        except ValueError as error:
            if "not float64" not in str(error):
                FAILURES.append(f"float64 with backend='triton': {error}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "auto" on a CPU tensor runs the reference: no fallback warning
            frequency_split(x.double(), 1.0)

        # 6. Empty input, and the launchers' own checks.
        low, high = kernel.frequency_split_triton(torch.zeros(0, 2, 8, 8), 1.0)
        if low.shape != (0, 2, 8, 8) or high.shape != (0, 2, 8, 8):
            FAILURES.append(f"empty input: {low.shape}, {high.shape}")
        op = kernel.frequency_split_triton

        def raises(pattern, fn, *args):
            import re
            try:
                fn(*args)
                FAILURES.append(f"no error for {pattern}")
            except ValueError as error:
                if not re.search(pattern, str(error)):
                    FAILURES.append(f"wrong message for {pattern}: {error}")

        raises(r"x must be float32, bfloat16 or float16, got torch.float64", op, torch.zeros(1, 1, 8, 8).double(), 1.)
        raises(r"x must have shape \\(B, C, H, W\\), got \\(8, 8\\)", op, torch.zeros(8, 8), 1.0)
        raises(r"sigma must be a finite number > 0, got -1.0", op, torch.zeros(1, 1, 8, 8), -1.0)
        raises(r"needs H and W > 3, got H=3, W=8", op, torch.zeros(1, 1, 3, 8), 1.0)
        raises(r"r = ceil\\(3 sigma\\) = 51 exceeds the kernels' limit 16", op, torch.zeros(1, 1, 60, 60), 17.0)
        bwd = kernel.frequency_split_bwd_triton
        raises(r"grad_high has shape \\(1, 1, 8, 9\\), grad_low has \\(1, 1, 8, 8\\)", bwd,
               torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9), 1.0, torch.float32)
        zeros = torch.zeros(1, 1, 8, 8)
        raises(r"dtype must be float32, bfloat16 or float16, got torch.int32", bwd, zeros, zeros, 1.0, torch.int32)

        # 7. The schemas and the autograd registration (the fake-tensor checks need a real device: under the
        #    interpreter the kernel would run on fake tensors; the CUDA test runs the full opcheck).
        x = make((1, 2, 9, 10), torch.float32, "contiguous", generator)
        utils = ("test_schema", "test_autograd_registration")
        torch.library.opcheck(torch.ops.torch_medloss.frequency_split_triton.default, (x, 1.0), test_utils=utils)
        torch.library.opcheck(torch.ops.torch_medloss.frequency_split_bwd_triton.default,
                              (torch.randn_like(x), torch.randn_like(x), 1.0, torch.float32), test_utils=utils)
        """
    )


@TRITON
def test_interpreted_tiny_sigma_is_the_identity():
    """sigma <= IDENTITY_SIGMA: the kernels give low = x and high = 0 exactly, as the reference does (fp32's
    log2_scale overflowed to -inf below ~5e-20 and gave NaN; below ~1e-162 the constants divided by zero)."""
    run_script(
        """
        from torch_medloss.functional.frequency_split import IDENTITY_SIGMA

        generator = torch.Generator().manual_seed(3)
        for sigma in (5e-324, 1e-200, 1e-20, 1e-3, IDENTITY_SIGMA):
            for dtype, layout in ((torch.float32, "contiguous"), (torch.bfloat16, "channels_last")):
                x = make((2, 2, 6, 5), dtype, layout, generator)
                name = f"sigma={sigma} {dtype}"
                low, high, _ = check(name, x, sigma, generator)
                exact(f"{name} low == x", low, x)
                exact(f"{name} high == 0", high, torch.zeros_like(x))
                exact(f"{name} front end", frequency_split(x, sigma, backend="triton")[0], x)
        """
    )


@TRITON
def test_interpreted_empty_channels_and_batch():
    """B = 0 or C = 0 through the Triton front end: empty outputs of x's shape and layout and an empty gradient,
    as the reference gives."""
    run_script(
        """
        for shape in ((2, 0, 8, 8), (0, 0, 8, 8), (0, 3, 8, 8)):
            for layout in ("contiguous", "channels_last"):
                x = torch.zeros(shape)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                low, high = frequency_split(x, 1.0, backend="triton")
                expected_low, expected_high = reference_split(x, 1.0)
                for got, expected in ((low, expected_low), (high, expected_high)):
                    if got.shape != shape or got.stride() != expected.stride() or got.dtype != x.dtype:
                        FAILURES.append(f"{shape} {layout}: {got.shape} {got.stride()} vs {expected.stride()}")
                (grad,) = torch.autograd.grad((low, high), x, (torch.ones_like(low), torch.ones_like(high)))
                if grad.shape != shape:
                    FAILURES.append(f"{shape} {layout}: gradient of shape {grad.shape}")
        """
    )


# ------------------------------------------------------------------------------- compiled for sm_90, CPU


def _has_nvidia_backend() -> bool:
    if not HAS_TRITON:
        return False
    import triton.backends

    return "nvidia" in triton.backends.backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend")
def test_triton_compiles_for_sm90():
    """Compile both kernels ahead of time for an H100 (sm_90a) at the heuristic's sizes; no GPU needed.

    The interpreter is lax about types; the compiler is not (branch results, loop-carried values, pointer dtypes).
    ptxas -v reports registers and spills, printed for the GPU session (not asserted: no timing backs a limit yet).
    """
    result = run_script(
        """
        def compile_and_count(fn, types, radius, precision):
            tile_h, tile_w, num_warps, *_ = kernel._launch_sizes((16, 3, 512, 512), radius)
            constants = dict(TILE_H=tile_h, TILE_W=tile_w, DOT_PRECISION=precision)
            # The usual specialisation of a contiguous layout: unit W strides become constants.
            constants.update({name: 1 for name in fn.arg_names if name.startswith("stride") and name.endswith("_w")})
            registers, spills = ptxas_report(fn, types, constants, num_warps, float_args=("log2_scale", "inv_norm"))
            print(fn.__name__, types, f"r={radius}", precision, f"T={tile_h}x{tile_w}", f"warps={num_warps}",
                  "registers", registers, "spills", spills)

        for dtype in ("*fp32", "*bf16"):
            for radius, precision in [(3, "ieee"), (12, "ieee"), (3, "tf32x3")]:
                compile_and_count(kernel._frequency_split_fwd_kernel,
                                  {"x_ptr": dtype, "low_ptr": dtype, "high_ptr": dtype}, radius, precision)
                compile_and_count(kernel._frequency_split_bwd_kernel,
                                  {"grad_x_ptr": dtype, "grad_low_ptr": dtype, "grad_high_ptr": dtype}, radius,
                                  precision)
        """,
        interpret=False,
    )
    print(result.stdout)


# ---------------------------------------------------------------------------------------------------- CUDA


COMPILED = pytest.mark.skipif(INTERPRETED, reason="runs the compiled kernels, not the interpreter")


def _kernel_module() -> dict:
    """PRELUDE run in this process (the kernel module is loaded once): its kernel, helpers and FAILURES list."""
    return helpers.exec_prelude(PRELUDE)


@CUDA
@TRITON
@COMPILED
@pytest.mark.parametrize("sigma", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference(dtype, sigma):
    """512^2 images, contiguous and channels_last: values, high == x - low bitwise, gradients; then opcheck."""
    env = _kernel_module()
    generator = torch.Generator().manual_seed(int(10 * sigma))
    for shape, layout in [
        ((2, 3, 512, 512), "contiguous"),
        ((2, 1, 512, 512), "channels_last"),
        ((1, 3, 509, 263), "transposed"),
    ]:
        x = env["make"](shape, dtype, layout, generator, device="cuda")
        env["check"](f"cuda {shape} {layout} {dtype} sigma={sigma}", x, sigma, generator)
    low, high = env["frequency_split"](x, sigma)  # "auto" runs Triton on CUDA
    env["exact"]("auto == triton", low, env["kernel"].frequency_split_triton(x, sigma)[0])
    env["finish"]()
    small = env["make"]((2, 3, 40, 37), dtype, "contiguous", generator, device="cuda")
    torch.library.opcheck(torch.ops.torch_medloss.frequency_split_triton.default, (small, sigma))
    grads = (torch.randn_like(small), torch.randn_like(small), sigma, dtype)
    torch.library.opcheck(torch.ops.torch_medloss.frequency_split_bwd_triton.default, grads)


@CUDA
@TRITON
@COMPILED
def test_cuda_triton_compile_and_float64_fallback():
    """torch.compile(fullgraph=True) traces the op; float64 under "auto" falls back to the reference with a warning."""
    env = _kernel_module()
    x = torch.randn(2, 3, 64, 48, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda t: env["kernel"].frequency_split_triton(t, 1.5), fullgraph=True)
    low, high = compiled(x)
    expected_low, _ = env["reference_split"](x, 1.5)
    torch.testing.assert_close(low, expected_low, **env["FP32"])
    assert torch.equal(high, x - low)
    (low + 2 * high).sum().backward()
    with pytest.warns(UserWarning, match="not float64"):
        env["frequency_split"](x.detach().double(), 1.5)


@CUDA
@TRITON
@COMPILED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_bandwidth_report(dtype):
    """Prints the forward's bandwidth (one read of x, two writes) against a copy's for B16 C1/C3 512^2; no assert
    (the target, >= 70% of copy bandwidth, is for the benchmark session to judge)."""
    import triton.testing

    env = _kernel_module()
    for channels in (1, 3):
        x = torch.randn(16, channels, 512, 512, device="cuda").to(dtype)
        out = torch.empty_like(x)
        copy_ms = triton.testing.do_bench(lambda out=out, x=x: out.copy_(x))
        for sigma in (1.0, 2.0, 4.0):
            ms = triton.testing.do_bench(lambda s=sigma, x=x: env["kernel"].frequency_split_triton(x, s))
            bytes_moved = 3 * x.numel() * x.element_size()
            copy_rate = 2 * x.numel() * x.element_size() / copy_ms / 1e6
            rate = bytes_moved / ms / 1e6
            print(
                f"B16 C{channels} 512^2 {dtype} sigma={sigma}: {ms * 1e3:.1f} us, {rate:.0f} GB/s, "
                f"{100 * rate / copy_rate:.0f}% of copy ({copy_rate:.0f} GB/s)"
            )
