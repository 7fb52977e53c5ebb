"""Tests of the Triton DBCE kernels (kernels/dbce.py) against torch_medloss.reference.dbce_ops.

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
# from kernels/ in this checkout), the case generators and the comparisons that record failures.
PRELUDE = """
from torch_medloss.reference import dbce_ops as ref

kernel = load_kernel("dbce")
FP32 = dict(rtol=2e-5, atol=2e-6)


def compare(name, got, expected, rtol=0.0, atol=0.0):
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, check_dtype=True, equal_nan=True)
    except AssertionError as error:
        worst = (got.double() - expected.double()).abs().flatten().argmax() if got.numel() else 0
        FAILURES.append(
            f"{name}: {error}\\n  got      {got.flatten()[:12].tolist()} (worst {got.flatten()[worst].item()})"
            f"\\n  expected {expected.flatten()[:12].tolist()} (worst {expected.flatten()[worst].item()})"
            if got.numel() and got.shape == expected.shape else f"{name}: {error}"
        )


def labels_for(shape, dtype, num_classes, ignore_index, generator, invalid=True):
    # Valid labels, invalid ones on both sides (if asked), and about 20% ignore_index where the dtype can hold it.
    info = torch.iinfo(dtype)
    low, high = (max(info.min, -2), num_classes + 3) if invalid else (0, num_classes)
    labels = torch.randint(low, high, shape, generator=generator)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(shape, generator=generator) < 0.2] = ignore_index
    labels = labels.to(dtype)
    if invalid and dtype == torch.int64 and labels.numel() > 1:
        labels.view(-1)[1] = 2**32 + 1  # wraps onto class 1 if anything narrows it to int32
    return labels


def check_masks(name, labels, num_classes, ignore_index, element, radius, spacing):
    args = (labels, num_classes, ignore_index, element, radius, spacing)
    got = kernel.dbce_masks_triton(*args)
    expected = ref.dbce_masks(*args)
    for part, a, b in zip(("masks", "counts", "areas", "invalid"), got, expected):
        compare(f"{name} {part}", a, b)
    return got


def check_ce(name, logits, labels, masks, weights, ignore_index, write_map, generator, tol=FP32, grad_tol=FP32):
    args = (logits, labels, masks, weights, ignore_index, write_map)
    sums, weighted = kernel.dbce_ce_fwd_triton(*args)
    expected_sums, expected_map = ref.dbce_ce_fwd(*args)
    compare(f"{name} sums", sums, expected_sums, **tol)
    compare(f"{name} map", weighted, expected_map, **tol)
    batch, _, pixels = logits.shape
    grad_sums = torch.randn(batch, 2, generator=generator)
    grad_map = torch.randn(batch, pixels, generator=generator) if write_map else torch.zeros(0)
    grad = kernel.dbce_ce_bwd_triton(grad_sums, grad_map, *args)
    compare(f"{name} grad", grad, ref.dbce_ce_bwd(grad_sums, grad_map, *args), **grad_tol)
    if grad.stride() != torch.empty_like(logits).stride():
        FAILURES.append(f"{name}: grad strides {grad.stride()} != those of empty_like(logits)")
    # Scaling the upstream gradient by 2 scales the gradient by 2 exactly (except fp16 subnormals).
    twice = kernel.dbce_ce_bwd_triton(2 * grad_sums, 2 * grad_map, *args)
    compare(f"{name} grad x2", twice, 2 * grad, **({} if logits.dtype != torch.float16 else grad_tol))
    return sums, weighted, grad

"""


def run_script(body: str, interpret: bool = True) -> subprocess.CompletedProcess:
    """helpers.run_script with this file's PRELUDE: a fresh interpreter, under TRITON_INTERPRET=1 or not."""
    return helpers.run_script(PRELUDE, body, interpret)


# ------------------------------------------------------------------------------------------------ masks, CPU


@TRITON
def test_interpreted_masks():
    """Masks, counts, areas and invalid bitwise equal to the reference over elements, radii, spacings, dims, C."""
    run_script(
        """
        import itertools

        generator = torch.Generator().manual_seed(0)
        BALL, CUBE = 0, 1

        # 1. Elements x radii x spacings on a 3-D volume (1x5x6x7), C = 3, ignore_index inside [0, C).
        spacings = [[1.0, 1.0, 1.0], [2.0, 1.0, 0.7], [0.5, 1.5, 1.0]]
        for element, radius, spacing in itertools.product((BALL, CUBE), (0.0, 1.0, 1.5, 2.5), spacings):
            labels = labels_for((1, 5, 6, 7), torch.int64, 3, 2, generator)
            check_masks(f"3d el={element} R={radius} s={spacing}", labels, 3, 2, element, radius, spacing)
        # Radius 10 (every window clipped to the image) and radius sqrt(2) (the diagonal exactly on the boundary).
        for element in (BALL, CUBE):
            labels = labels_for((2, 5, 6, 7), torch.int32, 4, -100, generator)
            check_masks(f"R=10 el={element}", labels, 4, -100, element, 10.0, [1.0, 1.0, 1.0])
            sparse = torch.full((1, 7, 7, 7), -100, dtype=torch.int64)
            sparse[0, 3, 3, 3] = 1
            sparse[0, 0, 6, 0] = 0
            check_masks(f"sparse R=sqrt2 el={element}", sparse, 2, -100, element, 2**0.5, [1.0, 1.0, 1.0])
            check_masks(f"sparse R=sqrt3 el={element}", sparse, 2, -100, element, 3**0.5, [1.0, 1.0, 1.0])
            check_masks(f"sparse R=3 el={element}", sparse, 2, -100, element, 3.0, [1.0, 1.0, 1.0])

        # 2. 1-D (B, 1, 1, W) and 2-D (B, 1, H, W) maps, with spacing on the size-1 axes that would give a large
        #    window (clipped to the size).
        for element, radius in itertools.product((BALL, CUBE), (1.0, 2.5)):
            labels = labels_for((2, 1, 1, 13), torch.int16, 3, -100, generator)
            check_masks(f"1d el={element} R={radius}", labels, 3, -100, element, radius, [0.01, 0.01, 1.0])
            labels = labels_for((2, 1, 9, 8), torch.uint8, 3, 255, generator)
            check_masks(f"2d el={element} R={radius}", labels, 3, 255, element, radius, [1.0, 1.0, 0.8])

        # 3. Class counts across every mask dtype (C = 1, 2, 5, 9, 17, 64: uint8, int16, int32, int64 and its sign
        #    bit), every label dtype.
        dtypes = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.int64]
        for num_classes, dtype in zip((1, 2, 5, 9, 17, 64), dtypes):
            for element in (BALL, CUBE):
                ignore = 255 if dtype == torch.uint8 else -100
                labels = labels_for((2, 3, 4, 5), dtype, num_classes, ignore, generator)
                if num_classes == 64:
                    labels.view(-1)[:8] = 63  # bit 63
                got = check_masks(f"C={num_classes} {dtype} el={element}", labels, num_classes, ignore, element,
                                  1.5, [1.0, 1.0, 1.0])
                assert got[0].dtype == ref.mask_dtype(num_classes), got[0].dtype

        # 4. Strided labels (a permuted and a sliced view, an expanded batch), ignore_index out of range (a uint8
        #    map cannot hold -100: every label is then valid or invalid), an all-ignored image, invalid labels.
        base = labels_for((2, 7, 6, 5), torch.int64, 4, 3, generator)
        check_masks("permuted", base.permute(0, 3, 2, 1), 4, 3, BALL, 2.0, [1.0, 1.5, 1.0])
        check_masks("sliced", base[:, ::2, 1:, ::2], 4, 3, CUBE, 1.0, [1.0, 1.0, 1.0])
        check_masks("expanded", base[:1].expand(3, -1, -1, -1), 4, 3, BALL, 1.0, [1.0, 1.0, 1.0])
        check_masks("uint8, ignore -100", labels_for((1, 3, 4, 5), torch.uint8, 4, -100, generator), 4, -100, BALL,
                    1.0, [1.0, 1.0, 1.0])
        ignored = labels_for((2, 3, 4, 5), torch.int64, 3, -100, generator)
        ignored[1] = -100
        got = check_masks("all-ignored image", ignored, 3, -100, BALL, 1.5, [1.0, 1.0, 1.0])
        assert not got[0][1].any() and got[3][1].item() == 0
        bad = torch.tensor([0, 2**40, -7, 1, 1000, 2, -100, 5], dtype=torch.int64).view(1, 1, 2, 4)
        got = check_masks("invalid labels", bad, 3, -100, CUBE, 1.0, [1.0, 1.0, 1.0])
        compare("invalid count", got[3], torch.tensor([4]))

        # 5. Several programs per image and several tiles per program (shrunken heuristic), and the forced int64 path
        #    (bitwise the same results).
        saved = kernel._TILE_ELEMENTS, kernel._MIN_BLOCK, kernel._MAX_PROGRAMS_PER_IMAGE
        kernel._TILE_ELEMENTS, kernel._MIN_BLOCK, kernel._MAX_PROGRAMS_PER_IMAGE = 64, 8, 3
        cases = []
        for element, radius in itertools.product((BALL, CUBE), (1.0, 2.5)):
            labels = labels_for((2, 4, 5, 6), torch.int64, 5, -100, generator)
            args = (labels, 5, -100, element, radius, [1.0, 0.9, 1.2])
            check_masks(f"several programs el={element} R={radius}", *args)
            cases.append(args)
        first = [kernel.dbce_masks_triton(*args) for args in cases]
        kernel._FORCE_INT64 = True
        for index, args in enumerate(cases):
            again = kernel.dbce_masks_triton(*args)
            if not all(torch.equal(a, b) for a, b in zip(first[index], again)):
                FAILURES.append(f"int64 masks {index}: differs from the int32 path")
        kernel._FORCE_INT64 = False
        kernel._TILE_ELEMENTS, kernel._MIN_BLOCK, kernel._MAX_PROGRAMS_PER_IMAGE = saved

        # 6. Empty tensors: no launch, zero counts.
        for shape in [(0, 2, 3, 4), (2, 0, 3, 4), (2, 1, 1, 0)]:
            masks, counts, areas, invalid = kernel.dbce_masks_triton(torch.empty(shape, dtype=torch.int64), 3, -100,
                                                                     BALL, 1.0, [1.0, 1.0, 1.0])
            assert masks.shape == shape and masks.dtype == torch.uint8
            compare(f"empty {shape} counts", counts, torch.zeros(shape[0], 3, dtype=torch.int64))
            compare(f"empty {shape} areas", areas, torch.zeros(shape[0], 3, dtype=torch.int64))
            compare(f"empty {shape} invalid", invalid, torch.zeros(shape[0], dtype=torch.int64))

        # 7. Errors.
        def raises(match, *args, op=kernel.dbce_masks_triton):
            try:
                op(*args)
            except ValueError as error:
                if not __import__("re").search(match, str(error)):
                    FAILURES.append(f"error message {str(error)!r} does not match {match!r}")
            else:
                FAILURES.append(f"no ValueError for {match!r}")

        lab = torch.zeros(1, 2, 3, 4, dtype=torch.int64)
        raises(r"at most 64 classes fit a mask, got 65", lab, 65, -100, BALL, 1.0, [1.0, 1.0, 1.0])
        raises(r"labels must be \\(B, D, H, W\\), got shape \\(2, 3\\)", torch.zeros(2, 3, dtype=torch.int64), 3,
               -100, BALL, 1.0, [1.0, 1.0, 1.0])
        raises(r"labels must be uint8, int8, int16, int32 or int64, got torch.float32", lab.float(), 3, -100, BALL,
               1.0, [1.0, 1.0, 1.0])
        raises(r"element must be 0 \\(ball\\) or 1 \\(cube\\), got 2", lab, 3, -100, 2, 1.0, [1.0, 1.0, 1.0])
        raises(r"radius must be finite and >= 0, got -1.0", lab, 3, -100, BALL, -1.0, [1.0, 1.0, 1.0])
        raises(r"spacing must hold 3 finite positive values", lab, 3, -100, BALL, 1.0, [1.0, 1.0])
        raises(r"spacing must hold 3 finite positive values", lab, 3, -100, BALL, 1.0, [1.0, 0.0, 1.0])
        torch.library.opcheck(torch.ops.torch_medloss.dbce_masks_triton.default,
                              (lab, 3, -100, BALL, 1.0, [1.0, 1.0, 1.0]), test_utils=("test_schema",))
        """
    )


# ----------------------------------------------------------------------------------------- cross entropy, CPU


@TRITON
def test_interpreted_cross_entropy():
    """Forward and backward against the reference: C, dtypes, layouts, write_map, ignore_index, invalid labels,
    several programs, forced int64, determinism, empty tensors, errors and the schemas."""
    run_script(
        """
        import itertools, re

        generator = torch.Generator().manual_seed(1)

        def masks_for(shape, num_classes, generator, dtype=None):
            dtype = dtype or ref.mask_dtype(num_classes)
            bits = torch.rand(*shape, num_classes, generator=generator) < 0.4
            value = (bits.long() << torch.arange(num_classes)).sum(-1)
            return value.to(dtype)

        # 1. fp32 grid: C x label dtype x write_map x ignore_index inside/outside [0, C).
        label_dtypes = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
        for i, (num_classes, write_map) in enumerate(itertools.product((1, 2, 5, 9, 17, 64), (True, False))):
            dtype = label_dtypes[i % 5]
            pixels = (1, 7, 33)[i % 3]
            batch = (1, 2)[(i // 3) % 2]
            ignore = (255 if dtype == torch.uint8 else -100, num_classes - 1)[i % 2]
            logits = 3 * torch.randn(batch, num_classes, pixels, generator=generator)
            labels = labels_for((batch, pixels), dtype, num_classes, ignore, generator)
            masks = masks_for((batch, pixels), num_classes, generator)
            weights = torch.rand(batch, num_classes, generator=generator) * 3
            check_ce(f"case {i}: C={num_classes} {dtype} S={pixels} B={batch} map={write_map} ignore={ignore}",
                     logits, labels, masks, weights, ignore, write_map, generator)

        # 2. Hand-computed: two classes, x = [0, log 3] at pixel 0 (label 1, w = max(0.5, 2) = 2) and pixel 1 ignored.
        import math
        logits = torch.tensor([[[0.0, 1.0], [math.log(3.0), 2.0]]])
        sums, weighted = kernel.dbce_ce_fwd_triton(logits, torch.tensor([[1, -100]]), torch.tensor([[3, 1]],
                                                   dtype=torch.uint8), torch.tensor([[0.5, 2.0]]), -100, True)
        compare("hand sums", sums, torch.tensor([[2 * math.log(4 / 3), 2.0]]), **FP32)
        compare("hand map", weighted, torch.tensor([[2 * math.log(4 / 3), 0.0]]), **FP32)

        # 3. bf16 / fp16 logits: the reference sees the same values and computes in fp32; the gradient to one
        #    rounding of its dtype.
        for dtype in (torch.bfloat16, torch.float16):
            logits = (3 * torch.randn(2, 5, 33, generator=generator)).to(dtype)
            labels = labels_for((2, 33), torch.int32, 5, -100, generator)
            weights = torch.rand(2, 5, generator=generator)
            check_ce(f"{dtype}", logits, labels, masks_for((2, 33), 5, generator), weights, -100, True, generator,
                     grad_tol=dict(rtol=torch.finfo(dtype).eps, atol=1e-5))

        # 4. channels_last logits read in place (strides (S*C, 1, C)); the gradient keeps that layout. Strided labels,
        #    masks and class weights; an int64 mask for C = 3 (any integer mask dtype is read).
        image = torch.randn(2, 5, 3, 7, generator=generator).contiguous(memory_format=torch.channels_last)
        flat = image.flatten(2)
        assert flat.data_ptr() == image.data_ptr() and flat.stride() == (105, 1, 5), flat.stride()
        labels = labels_for((21, 2), torch.int16, 5, 4, generator).t()
        masks = masks_for((2, 42), 5, generator)[:, ::2]
        weights = torch.rand(5, 2, generator=generator, dtype=torch.float64).t()
        _, _, grad = check_ce("channels_last", flat, labels, masks, weights.float(), 4, True, generator)
        assert grad.stride() == (105, 1, 5), grad.stride()
        check_ce("int64 masks, sliced logits", torch.randn(2, 3, 40, generator=generator)[:, :, 1::2],
                 labels_for((2, 20), torch.int64, 3, -100, generator), masks_for((2, 20), 3, generator, torch.int64),
                 torch.rand(2, 3, generator=generator), -100, False, generator)

        # 5. Invalid labels and ignored pixels: weight 0, no gradient, never an address.
        labels = torch.tensor([[0, 2**40, -7, 1, 1000, 2, -100]])
        logits = torch.randn(1, 3, 7, generator=generator)
        masks = torch.full((1, 7), 7, dtype=torch.uint8)
        weighted = kernel.dbce_ce_fwd_triton(logits, labels, masks, torch.ones(1, 3), -100, True)[1]
        compare("invalid map", weighted[:, [1, 2, 4, 6]], torch.zeros(1, 4))
        grad = kernel.dbce_ce_bwd_triton(torch.ones(1, 2), torch.ones(1, 7), logits, labels, masks, torch.ones(1, 3),
                                         -100, True)
        compare("invalid grad", grad[0, :, [1, 2, 4, 6]], torch.zeros(3, 4))
        check_ce("invalid labels", logits, labels, masks, torch.rand(1, 3, generator=generator), -100, True, generator)

        # 6. Several programs and tiles per program; determinism; the forced int64 path gives the same bits.
        saved = kernel._TILE_ELEMENTS, kernel._MIN_BLOCK, kernel._MAX_PROGRAMS_PER_IMAGE
        kernel._TILE_ELEMENTS, kernel._MIN_BLOCK, kernel._MAX_PROGRAMS_PER_IMAGE = 64, 8, 2
        assert kernel._launch_sizes(3, 101) == (4, 16, 2, 64), kernel._launch_sizes(3, 101)
        cases = []
        for write_map in (True, False):
            args = (3 * torch.randn(2, 3, 101, generator=generator), labels_for((2, 101), torch.int64, 3, 1, generator),
                    masks_for((2, 101), 3, generator), torch.rand(2, 3, generator=generator), 1, write_map)
            check_ce(f"several programs map={write_map}", *args, generator)
            cases.append(args)
        grad_sums = torch.randn(2, 2, generator=generator)
        grad_map = torch.randn(2, 101, generator=generator)

        def run(args):
            fwd = kernel.dbce_ce_fwd_triton(*args)
            return (*fwd, kernel.dbce_ce_bwd_triton(grad_sums, grad_map if args[-1] else torch.zeros(0), *args))

        for force in (False, True):
            kernel._FORCE_INT64 = force
            results = [run(args) for args in cases]
            for index, args in enumerate(cases):
                if not all(torch.equal(a, b) for a, b in zip(results[index], run(args))):
                    FAILURES.append(f"determinism {index} (int64={force}): two runs differ")
            if force and not all(torch.equal(a, b) for r32, r64 in zip(int32_results, results)
                                 for a, b in zip(r32, r64)):
                FAILURES.append("int64 path differs from the int32 path")
            int32_results = results
        kernel._FORCE_INT64 = False
        kernel._TILE_ELEMENTS, kernel._MIN_BLOCK, kernel._MAX_PROGRAMS_PER_IMAGE = saved

        # 7. Empty tensors: zero sums, empty map or gradient, no launch.
        for shape in [(0, 3, 5), (2, 3, 0)]:
            logits = torch.empty(shape)
            args = (logits, torch.empty(shape[0], shape[2], dtype=torch.int64),
                    torch.empty(shape[0], shape[2], dtype=torch.uint8), torch.ones(shape[0], 3), -100, True)
            sums, weighted = kernel.dbce_ce_fwd_triton(*args)
            compare(f"empty {shape} sums", sums, torch.zeros(shape[0], 2))
            assert weighted.shape == (shape[0], shape[2]), weighted.shape
            grad = kernel.dbce_ce_bwd_triton(torch.ones(shape[0], 2), torch.ones(shape[0], shape[2]), *args)
            assert grad.shape == shape and grad.dtype == torch.float32

        # 8. Errors name the op and the problem.
        def raises(match, *args, op=kernel.dbce_ce_fwd_triton):
            try:
                op(*args)
            except ValueError as error:
                if not re.search(match, str(error)):
                    FAILURES.append(f"error message {str(error)!r} does not match {match!r}")
            else:
                FAILURES.append(f"no ValueError for {match!r}")

        lab, msk, cw = torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2, 3)
        raises(r"dbce_ce_fwd_triton: logits must be float32, bfloat16 or float16, got torch.float64",
               torch.zeros(2, 3, 5, dtype=torch.float64), lab, msk, cw, -100, True)
        raises(r"logits must be 3-D \\(B, C, S\\)", torch.zeros(2, 3), lab, msk, cw, -100, True)
        raises(r"must be in \\[1, 64\\] .* got 65", torch.zeros(2, 65, 5), lab, msk, torch.ones(2, 65), -100, True)
        raises(r"labels must have shape \\(B, S\\) = \\(2, 5\\)", torch.zeros(2, 3, 5), lab[:, :4], msk, cw, -100, True)
        raises(r"masks must be uint8, int8, int16, int32 or int64, got torch.float32", torch.zeros(2, 3, 5), lab,
               msk.float(), cw, -100, True)
        raises(r"class_weights must be a float tensor of shape \\(B, C\\) = \\(2, 3\\)", torch.zeros(2, 3, 5), lab,
               msk, torch.ones(3), -100, True)
        raises(r"dbce_ce_bwd_triton: grad_sums must be a float tensor of shape \\(B, 2\\)", torch.ones(2, 3),
               torch.ones(2, 5), torch.zeros(2, 3, 5), lab, msk, cw, -100, True, op=kernel.dbce_ce_bwd_triton)
        raises(r"grad_map must be a float tensor of shape \\(B, S\\) = \\(2, 5\\)", torch.ones(2, 2),
               torch.ones(2, 4), torch.zeros(2, 3, 5), lab, msk, cw, -100, True, op=kernel.dbce_ce_bwd_triton)

        # 9. The schemas (the fake-tensor checks need a real device; the CUDA test runs the full opcheck).
        args = (torch.randn(2, 3, 7), labels_for((2, 7), torch.int32, 3, -100, generator), masks_for((2, 7), 3,
                generator), torch.rand(2, 3, generator=generator), -100, True)
        torch.library.opcheck(torch.ops.torch_medloss.dbce_ce_fwd_triton.default, args, test_utils=("test_schema",))
        torch.library.opcheck(torch.ops.torch_medloss.dbce_ce_bwd_triton.default,
                              (torch.randn(2, 2), torch.randn(2, 7), *args), test_utils=("test_schema",))
        """
    )


# ---------------------------------------------------------------------------------------------------- CUDA


COMPILED = pytest.mark.skipif(INTERPRETED, reason="runs the compiled kernels, not the interpreter")


def _kernel_module() -> dict:
    """PRELUDE run in this process (the kernel module is loaded once): its kernel, helpers and FAILURES list."""
    return helpers.exec_prelude(PRELUDE)


@CUDA
@TRITON
@COMPILED
@pytest.mark.parametrize("element", [0, 1])
@pytest.mark.parametrize("radius", [3.0, 10.0])
def test_cuda_masks_match_reference(element, radius):
    env = _kernel_module()
    generator = torch.Generator().manual_seed(0)
    # Sparse blobs so that the dilation matters: mostly background, a few labelled spheres, some ignored pixels.
    labels = torch.zeros(2, 64, 64, 64, dtype=torch.int64)
    labels[torch.rand(labels.shape, generator=generator) < 0.002] = 2
    labels[torch.rand(labels.shape, generator=generator) < 0.001] = 3
    labels[:, :8] = -100
    labels = labels.cuda()
    for spacing in ([1.0, 1.0, 1.0], [2.0, 1.0, 1.0]):
        env["check_masks"](f"cuda el={element} R={radius} {spacing}", labels, 4, -100, element, radius, spacing)
    assert not env["FAILURES"], "\n".join(env["FAILURES"])


@CUDA
@TRITON
@COMPILED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ce_matches_reference(dtype):
    env = _kernel_module()
    generator = torch.Generator().manual_seed(1)
    shape = (2, 4, 17 * 19 * 23)
    logits = (3 * torch.randn(shape, generator=generator)).to(dtype).cuda()
    labels = env["labels_for"]((2, shape[2]), torch.uint8, 4, 255, generator).cuda()
    masks = torch.randint(0, 16, (2, shape[2]), generator=generator).to(torch.uint8).cuda()
    weights = torch.rand(2, 4, generator=generator).cuda()
    grad_tol = env["FP32"] if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    tol = env["FP32"] if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)
    for write_map in (True, False):
        env["check_ce"](f"cuda {dtype} map={write_map}", logits, labels, masks, weights, 255, write_map,
                        torch.Generator().manual_seed(2), tol=tol, grad_tol=grad_tol)
    assert not env["FAILURES"], "\n".join(env["FAILURES"])


@CUDA
@TRITON
@COMPILED
def test_cuda_deterministic_and_opcheck():
    env = _kernel_module()
    kernel = env["kernel"]
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 64, 64, 64), generator=generator).cuda()
    masks_args = (labels, 4, -100, 0, 3.0, [1.0, 1.0, 1.0])
    first = kernel.dbce_masks_triton(*masks_args)
    logits = torch.randn(2, 4, 64**3, generator=generator).cuda()
    ce_args = (logits, labels.flatten(1), first[0].flatten(1), torch.rand(2, 4, device="cuda"), -100, True)
    sums, weighted = kernel.dbce_ce_fwd_triton(*ce_args)
    grad_sums, grad_map = torch.randn(2, 2, device="cuda"), torch.randn(2, 64**3, device="cuda")
    grad = kernel.dbce_ce_bwd_triton(grad_sums, grad_map, *ce_args)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(kernel.dbce_masks_triton(*masks_args), first, strict=True))
        again = kernel.dbce_ce_fwd_triton(*ce_args)
        assert torch.equal(again[0], sums) and torch.equal(again[1], weighted)
        assert torch.equal(kernel.dbce_ce_bwd_triton(grad_sums, grad_map, *ce_args), grad)

    small_labels = labels[:, :5, :6, :7]
    torch.library.opcheck(torch.ops.torch_medloss.dbce_masks_triton.default,
                          (small_labels, 4, -100, 0, 1.5, [1.0, 1.0, 1.0]))
    small = (logits[:, :, :999], labels.flatten(1)[:, :999], first[0].flatten(1)[:, :999], ce_args[3], -100, True)
    torch.library.opcheck(torch.ops.torch_medloss.dbce_ce_fwd_triton.default, small)
    torch.library.opcheck(torch.ops.torch_medloss.dbce_ce_bwd_triton.default,
                          (grad_sums, grad_map[:, :999].contiguous(), *small))
