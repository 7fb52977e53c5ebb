"""Tests of the Triton dice_sums kernels (kernels/dice_sums.py) against torch_medloss.reference.dice_sums.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess: the variable must be set before triton is imported,
and setting it here would change how every later test module sees triton. Each subprocess runs many cases (one
interpreter start-up costs seconds) and collects every mismatch before failing, printing the differing values.
The shapes are tiny; a few cases shrink the launch heuristic's constants so that a program walks several tiles and
an image has several programs. The CUDA tests at the end run the compiled kernels on larger shapes.
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
# from kernels/ in this checkout, so that the tests run without `pip install -e .`), the case generators and the
# comparison that records failures instead of stopping at the first.
PRELUDE = """
import numpy as np

from torch_medloss.reference.dice_sums import dice_sums_bwd, dice_sums_fwd

np.seterr(all="ignore")  # the interpreter computes log2(0) = -inf on purpose (m = 0 at d = 0)
kernel = load_kernel("dice_sums")

FP32 = dict(rtol=2e-5, atol=2e-5)


def compare(name, got, expected, rtol, atol):
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, check_dtype=True)
    except AssertionError as error:
        worst = (got.double() - expected.double()).abs().flatten().argmax()
        FAILURES.append(
            f"{name}: {error}\\n  got      {got.flatten()[:12].tolist()} (worst {got.flatten()[worst].item()})"
            f"\\n  expected {expected.flatten()[:12].tolist()} (worst {expected.flatten()[worst].item()})"
        )


def labels_for(shape, dtype, num_classes, ignore_index, generator):
    # Valid labels, invalid ones on both sides, and about 20% ignore_index where the dtype can hold it.
    info = torch.iinfo(dtype)
    labels = torch.randint(max(info.min, -2), num_classes + 3, shape, generator=generator)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(shape, generator=generator) < 0.2] = ignore_index
    labels = labels.to(dtype)
    if dtype == torch.int64 and labels.numel() > 1:
        labels.view(-1)[1] = 2**32 + 1  # wraps onto class 1 if anything narrows it to int32
    if dtype == torch.uint8 and labels.numel() > 2:
        labels.view(-1)[2] = 156  # -100 as uint8: must stay invalid, not ignored
    return labels


def dense_for(shape, kind, dtype, generator):
    batch, num_classes, pixels = shape
    if kind == "onehot":
        y = torch.nn.functional.one_hot(torch.randint(0, num_classes, (batch, pixels), generator=generator),
                                        num_classes).movedim(-1, 1).float()
    else:
        y = torch.softmax(2 * torch.randn(shape, generator=generator), 1)
    y = y * (torch.rand(batch, 1, pixels, generator=generator) > 0.25)  # some all-zero pixels (mask mode 3)
    return y.to(dtype)


def check(name, logits, target, gamma, ce_weight, activation, labels, ignore_index, mask_mode, squared, with_ce,
          smoothing, generator, tol=FP32, grad_tol=FP32):
    options = (gamma, ce_weight, activation, labels, ignore_index, mask_mode, squared, with_ce, smoothing)
    sums, extras = kernel.dice_sums_fwd_triton(logits, target, *options)
    expected_sums, expected_extras = dice_sums_fwd(logits, target, *options)
    compare(f"{name} sums", sums, expected_sums, **tol)
    compare(f"{name} extras", extras, expected_extras, **tol)
    batch, num_classes = logits.shape[:2]
    grad_sums = torch.randn(batch, num_classes, 4, generator=generator).to(logits.device)
    grad_extras = torch.randn(batch, 3, generator=generator).to(logits.device)
    grad = kernel.dice_sums_bwd_triton(grad_sums, grad_extras, logits, target, *options)
    expected_grad = dice_sums_bwd(grad_sums, grad_extras, logits, target, *options)
    compare(f"{name} grad", grad, expected_grad, **grad_tol)
    if grad.stride() != torch.empty_like(logits).stride():
        FAILURES.append(f"{name}: grad strides {grad.stride()} != those of empty_like(logits)")
    # The upstream gradient scaled by 2 scales the gradient by 2, exactly in binary floating point, except where
    # float16 rounds to a subnormal.
    twice = kernel.dice_sums_bwd_triton(2 * grad_sums, 2 * grad_extras, logits, target, *options)
    exact = dict(rtol=0, atol=0) if logits.dtype != torch.float16 else grad_tol
    compare(f"{name} grad x2", twice, 2 * grad, **exact)
    return sums, extras, grad

"""


def run_script(body: str, interpret: bool = True) -> subprocess.CompletedProcess:
    """helpers.run_script with this file's PRELUDE: a fresh interpreter, under TRITON_INTERPRET=1 or not."""
    return helpers.run_script(PRELUDE, body, interpret)


# ---------------------------------------------------------------------------------------- option grid, CPU


@TRITON
def test_interpreted_option_grid():
    """Every activation x target kind x mask mode; the other options cycle so that each value meets many others.

    Targets: int64, int32, int16, int8 and uint8 label maps (with invalid labels and ignore_index pixels), one-hot
    and soft dense targets (float32, float64, bfloat16). C in {1, 2, 3, 5, 20} (20: BLOCK_C = 32 > 16), S in
    {1, 7, 33}, B in {1, 2}; squared on/off; gamma zero, 2 for every class, or per class with some zeros; no CE, CE
    with class weights, CE with weights and label smoothing; ignore_index inside and outside [0, C).
    """
    run_script(
        """
        import itertools

        generator = torch.Generator().manual_seed(0)
        TARGETS = ["int64", "int32", "int16", "int8", "uint8", "onehot", "soft"]
        SOFT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
        for i, (activation, kind, mask_mode) in enumerate(itertools.product((0, 1, 2), TARGETS, (0, 1, 2, 3))):
            num_classes = (1, 2, 3, 5, 20)[i % 5]
            pixels = (1, 7, 33)[i % 3]
            batch = (1, 2)[(i // 3) % 2]
            squared = bool((i // 2) % 2)
            gamma_kind = (i // 5) % 3
            with_ce, smoothing = [(False, 0.0), (True, 0.0), (True, 0.1)][(i // 7) % 3]
            labels = kind not in ("onehot", "soft")
            logits = 3 * torch.randn(batch, num_classes, pixels, generator=generator)
            if labels:
                dtype = getattr(torch, kind)
                outside = 255 if dtype == torch.uint8 else -100
                ignore_index = (outside, num_classes - 1)[(i // 4) % 2]
                target = labels_for((batch, pixels), dtype, num_classes, ignore_index, generator)
            else:
                ignore_index = (i // 4) % num_classes  # mask mode 2 needs a channel; the others ignore it
                target = dense_for(logits.shape, kind, SOFT_DTYPES[i % 3] if kind == "soft" else torch.float32,
                                   generator)
            if gamma_kind == 0:
                gamma = torch.zeros(num_classes)
            elif gamma_kind == 1:
                gamma = torch.full((num_classes,), 2.0)
            else:
                gamma = 3 * torch.rand(num_classes, generator=generator)
                gamma[::2] = 0.0
            ce_weight = 0.5 + 1.5 * torch.rand(num_classes, generator=generator)
            name = (f"case {i}: act={activation} {kind} mask={mask_mode} C={num_classes} S={pixels} B={batch} "
                    f"sq={squared} gamma={gamma_kind} ce={with_ce} eps={smoothing} ignore={ignore_index}")
            check(name, logits, target, gamma, ce_weight, activation, labels, ignore_index, mask_mode, squared,
                  with_ce, smoothing, generator)
        print("grid cases:", i + 1)
        """
    )


# ------------------------------------------------------------------------- layouts, dtypes, paths, CPU


@TRITON
def test_interpreted_layouts_dtypes_and_paths():
    """Hand values, bf16/fp16 logits, channels_last and strided inputs, invalid labels, several programs per image,
    the forced int64 path, determinism, empty tensors, C = 128, errors and the schema."""
    run_script(
        """
        import re

        generator = torch.Generator().manual_seed(1)
        ones = lambda c: torch.ones(c)

        # 1. Hand-computed: no activation, labels [0, 1], gamma 0, k = 1, C = 2, S = 2.
        x = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])
        sums, extras = kernel.dice_sums_fwd_triton(x, torch.tensor([[0, 1]]), torch.zeros(2), ones(2), 0, True,
                                                   -100, 1, False, False, 0.0)
        # class 0: p = [0.25, 0.5], y = [1, 0]; class 1: p = [0.75, 0.5], y = [0, 1].
        hand = torch.tensor([[[0.25, 0.75, 1.0, 1.25], [0.5, 1.25, 1.0, 1.25]]])
        compare("hand sums", sums, hand, rtol=0, atol=0)
        compare("hand extras", extras, torch.zeros(1, 3), rtol=0, atol=0)
        # Ties p' == y' (no activation, gamma 0 so that m = 1): D's gradient there is sign(0) = 0, as torch.abs's.
        labels = torch.tensor([[0, 1, 2, 1, 0, 2, 2]])
        ties = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
        ties[:, :, ::2] = torch.randn(1, 3, 4, generator=generator)
        check("ties", ties, labels, torch.zeros(3), ones(3), 0, True, -100, 0, False, False, 0.0, generator)

        # 2. bf16 / fp16 logits: the reference gets the same low-precision values and computes in fp32, so the sums
        #    agree to fp32 rounding and the gradient to one rounding of its dtype (eps = 2 roundings).
        for dtype in (torch.bfloat16, torch.float16):
            grad_tol = dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
            configs = [(1, True, 1, True), (2, False, 3, False), (0, True, 0, True)]
            for activation, labels, mask_mode, with_ce in configs:
                logits = (3 * torch.randn(2, 5, 33, generator=generator)).to(dtype)
                if labels:
                    target = labels_for((2, 33), torch.int32, 5, -100, generator)
                else:
                    target = dense_for((2, 5, 33), "soft", dtype, generator)
                gamma = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
                check(f"{dtype} act={activation} labels={labels}", logits, target, gamma, ones(5), activation,
                      labels, -100, mask_mode, True, with_ce, 0.05, generator, grad_tol=grad_tol)

        # 3. channels_last (B, C, H, W) flattened to (B, C, S) is read in place: strides (S*C, 1, C), no copy; the
        #    gradient keeps that layout.
        image = torch.randn(2, 5, 3, 7, generator=generator).contiguous(memory_format=torch.channels_last)
        flat = image.flatten(2)
        assert flat.data_ptr() == image.data_ptr() and flat.stride() == (105, 1, 5), flat.stride()
        labels = labels_for((2, 21), torch.int16, 5, 4, generator)
        _, _, grad = check("channels_last", flat, labels, torch.full((5,), 2.0), ones(5), 1, True, 4, 1, False,
                           True, 0.0, generator)
        assert grad.stride() == (105, 1, 5), grad.stride()
        dense = dense_for((2, 5, 21), "soft", torch.float32, generator)
        dense_cl = dense.view(2, 5, 3, 7).contiguous(memory_format=torch.channels_last).flatten(2)
        check("channels_last dense", flat, dense_cl, torch.rand(5, generator=generator), ones(5), 2, False, 0, 3,
              True, True, 0.1, generator)

        # 4. Strided inputs: a transposed label map (strides (1, B)), a sliced dense target and sliced logits (whose
        #    gradient is contiguous: empty_like of a non-dense view), a broadcast label row (stride 0), strided gamma
        #    and ce_weight in float64, non-contiguous bf16 and broadcast upstream gradients.
        transposed = labels_for((33, 2), torch.int64, 3, -100, generator).t()
        assert transposed.stride() == (1, 2)
        check("transposed labels", torch.randn(2, 3, 33, generator=generator), transposed, torch.full((3,), 2.0),
              ones(3), 1, True, -100, 1, True, True, 0.0, generator)
        wide = torch.randn(2, 3, 70, generator=generator)
        sliced_target = dense_for((2, 3, 70), "onehot", torch.float32, generator)[:, :, ::2]
        check("sliced logits and target", wide[:, :, 1::2], sliced_target, torch.tensor([2.0, 0.0, 1.0]), ones(3), 1,
              False, 1, 2, False, True, 0.0, generator)
        row = labels_for((1, 9), torch.int32, 4, -100, generator).expand(2, 9)
        gamma64 = torch.tensor([0.0, 9.0, 2.0, 9.0, 1.0, 9.0, 0.5, 9.0], dtype=torch.float64)[::2]
        weight64 = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.5, 0.0, 1.5, 0.0], dtype=torch.float64)[::2]
        check("broadcast labels, strided float64 gamma", torch.randn(2, 4, 9, generator=generator), row, gamma64,
              weight64, 1, True, -100, 1, True, True, 0.2, generator)
        logits = torch.randn(2, 4, 9, generator=generator)
        options = (gamma64, weight64, 1, True, -100, 1, True, True, 0.2)
        grad_sums = torch.randn(4, 4, 2, generator=generator).to(torch.bfloat16).permute(2, 0, 1)
        grad_extras = torch.randn(3, 2, generator=generator).t()
        compare("strided bf16 upstream", kernel.dice_sums_bwd_triton(grad_sums, grad_extras, logits, row, *options),
                dice_sums_bwd(grad_sums, grad_extras, logits, row, *options), **FP32)
        # Upstream gradients broadcast from a scalar (stride 0), as autograd gives for sums.sum().backward().
        grad_sums, grad_extras = torch.tensor(0.75).expand(2, 4, 4), torch.tensor(-0.5).expand(2, 3)
        compare("stride-0 upstream", kernel.dice_sums_bwd_triton(grad_sums, grad_extras, logits, row, *options),
                dice_sums_bwd(grad_sums, grad_extras, logits, row, *options), **FP32)

        # 5. Invalid labels: counted, weight 0, no out-of-bounds read (a label of 2**40 or 1000 is never an address).
        labels = torch.tensor([[0, 2**40, -7, 1, 1000, 2, -100]])
        logits = torch.randn(1, 3, 7, generator=generator)
        options = (torch.full((3,), 2.0), ones(3), 1, True, -100, 1, True, False, 0.0)
        sums, extras = kernel.dice_sums_fwd_triton(logits, labels, *options)
        compare("invalid count", extras[:, 2], torch.tensor([3.0]), rtol=0, atol=0)
        grad = kernel.dice_sums_bwd_triton(torch.ones(1, 3, 4), torch.ones(1, 3), logits, labels, *options)
        compare("invalid pixels get no gradient", grad[0, :, [1, 2, 4, 6]], torch.zeros(3, 4), rtol=0, atol=0)
        check("invalid labels", logits, labels, *options, generator)

        # 6. Several programs per image, several tiles per program: with these constants C = 3 gives BLOCK_S = 16,
        #    S = 101 gives 7 tiles, 2 programs of 4 tiles, the last tile of program 1 wholly past the end.
        saved = kernel._TILE_ELEMENTS, kernel._MIN_BLOCK_S, kernel._MAX_PROGRAMS_PER_IMAGE
        kernel._TILE_ELEMENTS, kernel._MIN_BLOCK_S, kernel._MAX_PROGRAMS_PER_IMAGE = 64, 8, 2
        assert kernel._launch_sizes(3, 101) == (4, 16, 4, 2, 64), kernel._launch_sizes(3, 101)
        small_cases = []
        for activation, (labels, mask_mode), dtype in [(1, (True, 1), torch.uint8), (2, (False, 2), torch.float32),
                                                       (0, (True, 0), torch.int64), (1, (False, 3), torch.float16)]:
            logits = 3 * torch.randn(2, 3, 101, generator=generator)
            if labels:
                target = labels_for((2, 101), dtype, 3, 255 if dtype == torch.uint8 else 1, generator)
            else:
                target = dense_for((2, 3, 101), "soft", dtype, generator)
            args = (logits, target, torch.tensor([2.0, 0.0, 1.5]), torch.tensor([1.0, 2.0, 0.5]), activation, labels,
                    255 if dtype == torch.uint8 else 1, mask_mode, activation == 1, True, 0.1)
            check(f"several programs act={activation} {dtype}", *args, generator)
            small_cases.append(args)

        # 7. Determinism: two runs are bitwise equal (the partial rows are added in a fixed order).
        for index, args in enumerate(small_cases):
            first = kernel.dice_sums_fwd_triton(*args)
            second = kernel.dice_sums_fwd_triton(*args)
            grad_sums, grad_extras = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, generator=generator)
            grads = [kernel.dice_sums_bwd_triton(grad_sums, grad_extras, *args) for _ in range(2)]
            if not (torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
                    and torch.equal(grads[0], grads[1])):
                FAILURES.append(f"determinism {index}: two runs differ")

        # 8. The forced int64 offset path gives the same bits as the int32 one (same arithmetic, wider indices).
        chosen = []
        needs_int64 = kernel._needs_int64
        kernel._needs_int64 = lambda *a: chosen.append(needs_int64(*a)) or chosen[-1]
        int64_cases = small_cases + [(flat, dense_cl, torch.rand(5, generator=generator), ones(5), 1, False, 2, 2,
                                      True, True, 0.0)]
        for force in (False, True):
            kernel._FORCE_INT64 = force
            results = []
            for args in int64_cases:
                results.append(kernel.dice_sums_fwd_triton(*args))
                results.append(kernel.dice_sums_bwd_triton(torch.ones(2, args[0].shape[1], 4), torch.ones(2, 3), *args))
            if force:
                for index, (a, b) in enumerate(zip(int32_results, results)):
                    same = all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)
                    if not same:
                        FAILURES.append(f"int64 path {index}: differs from the int32 path")
            int32_results = results
        kernel._FORCE_INT64 = False
        kernel._needs_int64 = needs_int64
        assert chosen == [False] * 10 + [True] * 10, chosen
        kernel._TILE_ELEMENTS, kernel._MIN_BLOCK_S, kernel._MAX_PROGRAMS_PER_IMAGE = saved

        # 9. Empty tensors: zero sums (ce_den = S = 0), an empty gradient, no launch.
        for shape in [(0, 3, 5), (2, 3, 0)]:
            for labels in (True, False):
                logits = torch.empty(shape)
                target = torch.empty(shape[0], shape[2], dtype=torch.uint8) if labels else torch.empty(shape)
                options = (torch.ones(3), ones(3), 1, labels, -100, 1, True, True, 0.0)
                sums, extras = kernel.dice_sums_fwd_triton(logits, target, *options)
                compare(f"empty {shape} sums", sums, torch.zeros(shape[0], 3, 4), rtol=0, atol=0)
                compare(f"empty {shape} extras", extras, torch.zeros(shape[0], 3), rtol=0, atol=0)
                grad = kernel.dice_sums_bwd_triton(torch.ones(shape[0], 3, 4), torch.ones(shape[0], 3), logits, target,
                                                   *options)
                assert grad.shape == shape and grad.dtype == torch.float32

        # 10. The largest class count (BLOCK_C = 128, BLOCK_S = 32), with a tile crossing warps along the classes.
        check("C=128", 3 * torch.randn(1, 128, 40, generator=generator),
              labels_for((1, 40), torch.int64, 128, -100, generator), torch.full((128,), 2.0),
              torch.rand(128, generator=generator) + 0.5, 1, True, -100, 1, True, True, 0.1, generator)

        # 11. Errors name the op and the problem.
        def raises(match, *args, op=kernel.dice_sums_fwd_triton):
            try:
                op(*args)
            except ValueError as error:
                if not re.search(match, str(error)):
                    FAILURES.append(f"error message {str(error)!r} does not match {match!r}")
            else:
                FAILURES.append(f"no ValueError for {match!r}")

        lab = torch.zeros(2, 5, dtype=torch.int64)
        base = (torch.ones(3), ones(3), 1, True, -100, 1, False, False, 0.0)
        raises(r"dice_sums_fwd_triton: the number of classes .* must be in \\[1, 128\\] .* got 129",
               torch.zeros(2, 129, 5), lab, torch.ones(129), ones(129), *base[2:])
        raises(r"logits must be float32, bfloat16 or float16, got torch.float64", torch.zeros(2, 3, 5,
               dtype=torch.float64), lab, *base)
        raises(r"logits must be 3-D \\(B, C, S\\), got shape \\(2, 3\\)", torch.zeros(2, 3), lab, *base)
        raises(r"label target must have shape \\(B, S\\) = \\(2, 5\\) .* got \\(2, 6\\)", torch.zeros(2, 3, 5),
               torch.zeros(2, 6, dtype=torch.int64), *base)
        raises(r"label target must be uint8, int8, int16, int32 or int64, got torch.float32", torch.zeros(2, 3, 5),
               torch.zeros(2, 5), *base)
        raises(r"dense target must have the logits' shape", torch.zeros(2, 3, 5), torch.zeros(2, 5),
               torch.ones(3), ones(3), 1, False, 0, 0, False, False, 0.0)
        raises(r"gamma must be a float tensor of shape \\(C,\\) = \\(3,\\)", torch.zeros(2, 3, 5), lab,
               torch.ones(4), *base[1:])
        raises(r"activation must be 0 \\(none\\), 1 \\(softmax\\) or 2 \\(sigmoid\\), got 3", torch.zeros(2, 3, 5),
               lab, torch.ones(3), ones(3), 3, *base[3:])
        raises(r"mask_mode 2 .* needs 0 <= ignore_index < C = 3, got -100", torch.zeros(2, 3, 5),
               torch.zeros(2, 3, 5), torch.ones(3), ones(3), 1, False, -100, 2, False, False, 0.0)
        raises(r"dice_sums_bwd_triton: grad_sums must be a float tensor of shape \\(B, C, 4\\) = \\(2, 3, 4\\)",
               torch.ones(2, 3, 3), torch.ones(2, 3), torch.zeros(2, 3, 5), lab, *base,
               op=kernel.dice_sums_bwd_triton)

        # 12. The schemas (the fake-tensor check needs a real device: under the interpreter the kernel would run on
        #     fake tensors; the CUDA test runs the full opcheck).
        args = (torch.randn(2, 3, 7), labels_for((2, 7), torch.int32, 3, -100, generator), torch.ones(3), ones(3), 1,
                True, -100, 1, False, True, 0.0)
        torch.library.opcheck(torch.ops.torch_medloss.dice_sums_fwd_triton.default, args, test_utils=("test_schema",))
        torch.library.opcheck(torch.ops.torch_medloss.dice_sums_bwd_triton.default,
                              (torch.randn(2, 3, 4), torch.randn(2, 3), *args), test_utils=("test_schema",))
        """
    )


# ------------------------------------------------------------------------------- compiled for sm_90, CPU


def _has_nvidia_backend() -> bool:
    if not HAS_TRITON:
        return False
    import triton.backends

    return "nvidia" in triton.backends.backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend")
def test_compiles_for_sm90_without_spills():
    """Compile both kernels ahead of time for an H100 (sm_90a) with the launch heuristic's sizes; no GPU needed.

    The interpreter is lax about types; the compiler is not (loop-carried values, branch results, pointer dtypes).
    ptxas -v then must report no register spills for C <= 16, the sizes the heuristic is tuned for.
    """
    run_script(
        """
        FLAGS = ("ACTIVATION", "TARGET_IS_LABELS", "MASK_MODE", "SQUARED", "WITH_CE", "INT64_OFFSETS")

        def compile_and_count(fn, pointer_types, flags, num_classes):
            block_c, block_s, num_warps, _, _ = kernel._launch_sizes(num_classes, 128**3)
            constants = dict(zip(FLAGS, flags), BLOCK_C=block_c, BLOCK_S=block_s)
            # The usual specialisation of a contiguous (B, C, S) layout: unit pixel strides become constants.
            constants.update({name: 1 for name in fn.arg_names if name.endswith("_s") or name in (
                "stride_gamma", "stride_ce_weight", "stride_grad_sums_k")})
            registers, spills = ptxas_report(fn, pointer_types, constants, num_warps,
                                             float_args=("label_smoothing",))
            if num_classes <= 16 and spills:
                FAILURES.append(f"{fn.__name__} C={num_classes} {flags}: {registers} registers, spills {spills}")
            print(fn.__name__, num_classes, flags, registers, spills)

        # (C, logits dtype, target pointer type, flags): the two H100 workloads' option sets and some corners.
        for num_classes, logits_type, target_type, flags in [
            (4, "*fp32", "*i64", (1, True, 1, True, True, False)),
            (4, "*bf16", "*u8", (1, True, 1, False, False, False)),
            (14, "*fp32", "*i64", (1, True, 1, True, True, False)),
            (14, "*fp16", "*fp32", (2, False, 3, False, True, True)),
            (128, "*fp32", "*i8", (0, True, 0, True, True, True)),
        ]:
            types = {"logits_ptr": logits_type, "target_ptr": target_type, "grad_logits_ptr": logits_type}
            compile_and_count(kernel._dice_sums_fwd_kernel, types, flags, num_classes)
            compile_and_count(kernel._dice_sums_bwd_kernel, types, flags, num_classes)
        """,
        interpret=False,
    )


# ---------------------------------------------------------------------------------------------------- CUDA


COMPILED = pytest.mark.skipif(INTERPRETED, reason="runs the compiled kernels, not the interpreter")


def _kernel_module() -> dict:
    """PRELUDE run in this process (the kernel module is loaded once): its kernel, helpers and FAILURES list."""
    return helpers.exec_prelude(PRELUDE)


@CUDA
@TRITON
@COMPILED
@pytest.mark.parametrize("num_classes", [4, 14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(num_classes, dtype):
    env = _kernel_module()
    generator = torch.Generator().manual_seed(num_classes)
    shape = (2, num_classes, 17 * 19 * 23)
    logits = (3 * torch.randn(shape, generator=generator)).to(dtype).cuda()
    gamma = torch.full((num_classes,), 2.0, device="cuda")
    weight = (0.5 + torch.rand(num_classes, generator=generator)).cuda()
    grad_tol = env["FP32"] if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    labels = env["labels_for"]((2, shape[2]), torch.uint8, num_classes, 255, generator).cuda()
    dense = env["dense_for"](shape, "soft", torch.float32, generator).cuda()
    channels_last = logits.view(2, num_classes, 17, 19 * 23).contiguous(memory_format=torch.channels_last).flatten(2)
    for x, target, labels_mode, mask_mode in [(logits, labels, True, 1), (channels_last, dense, False, 3)]:
        env["check"](
            f"cuda C={num_classes} {dtype} labels={labels_mode}",
            x,
            target,
            gamma,
            weight,
            1,
            labels_mode,
            255 if labels_mode else 0,
            mask_mode,
            True,
            True,
            0.1,
            generator,
            grad_tol=grad_tol,
        )
    assert not env["FAILURES"], "\n".join(env["FAILURES"])


@CUDA
@TRITON
@COMPILED
def test_cuda_deterministic_opcheck_and_compile():
    env = _kernel_module()
    kernel = env["kernel"]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 64**3, generator=generator).cuda()
    labels = torch.randint(0, 4, (2, 64**3), generator=generator).to(torch.uint8).cuda()
    options = (torch.full((4,), 2.0, device="cuda"), torch.ones(4, device="cuda"), 1, True, -100, 1, False, True, 0.0)
    first = kernel.dice_sums_fwd_triton(logits, labels, *options)
    grad_sums, grad_extras = torch.randn(2, 4, 4, device="cuda"), torch.randn(2, 3, device="cuda")
    grad = kernel.dice_sums_bwd_triton(grad_sums, grad_extras, logits, labels, *options)
    for _ in range(3):
        again = kernel.dice_sums_fwd_triton(logits, labels, *options)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert torch.equal(kernel.dice_sums_bwd_triton(grad_sums, grad_extras, logits, labels, *options), grad)

    small = (logits[:, :, :999], labels[:, :999], *options)
    torch.library.opcheck(torch.ops.torch_medloss.dice_sums_fwd_triton.default, small)
    torch.library.opcheck(torch.ops.torch_medloss.dice_sums_bwd_triton.default, (grad_sums, grad_extras, *small))

    def loss(x):
        sums, extras = kernel.dice_sums_fwd_triton(x, labels[:, :999], *options)
        return sums[..., 0].sum() + extras[:, 0].sum()

    x = logits[:, :, :999]
    torch.testing.assert_close(torch.compile(loss, fullgraph=True)(x), loss(x))
