"""Tests of label_histogram: the reference against hand counts, every kernel against the reference, errors, fallback.

The C++ extension is built once (or loaded from the cache) by the ``cpp_op`` fixture. The Triton kernel runs under
TRITON_INTERPRET=1 in a subprocess: the variable must be set before triton is imported, and setting it here would
change how every later test module sees triton.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torch_medloss import _backend, _extension
from torch_medloss.__main__ import main
from torch_medloss.label_histogram import LABEL_DTYPES, _flatten_pixels, label_histogram
from torch_medloss.reference.label_histogram import label_histogram as reference

REPO = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_KERNELS = importlib.util.find_spec("torch_medloss.kernels") is not None
TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# torch_medloss.kernels is the repository's kernels/ directory mapped into the package by setup.py: it exists only
# once the package is installed (pip install -e . is enough).
KERNELS = pytest.mark.skipif(not HAS_KERNELS, reason="torch_medloss.kernels needs the package installed")

# (shape, num_classes): 1 to 3 spatial dims, odd and prime sizes, size-1 dims, one image over the CPU kernel's
# 32768-pixel task size (so that it sums several partial histograms), and more classes than pixels.
CASES = [
    ((1, 1), 1),
    ((2, 7), 3),
    ((3, 1, 13), 2),
    ((2, 5, 11), 5),
    ((1, 3, 5, 7), 14),
    ((4, 17, 1, 3), 4),
    ((3, 1, 1, 1), 2),
    ((2, 257, 131), 7),
    ((2, 3, 4), 300),
]
# ignore_index: PyTorch's default (outside every dtype's class range), inside [0, C), just past the classes, and a
# value that uint8 cannot hold (it must not wrap onto a label).
IGNORE_INDICES = (-100, 0, 255, 1000)


def random_labels(shape, dtype, num_classes, ignore_index, invalid=True, seed=0):
    """Labels mostly in [0, C), with some invalid values (when ``invalid``) and some ignore_index pixels."""
    generator = torch.Generator().manual_seed(seed)
    info = torch.iinfo(dtype)
    low = max(-3 if invalid else 0, info.min)
    high = min(num_classes + (3 if invalid else 0), info.max + 1)
    labels = torch.randint(low, high, shape, generator=generator)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(shape, generator=generator) < 0.2] = ignore_index
    return labels.to(dtype)


@pytest.fixture(scope="module")
def cpp_op():
    """torch.ops.torch_medloss.label_histogram, built (or loaded from the cache) once for the module."""
    reason = _extension.why_not_loaded(cuda=False)
    if reason is not None and os.environ.get("TORCH_MEDLOSS_NO_BUILD", "0") not in ("", "0"):
        pytest.skip(reason)
    assert reason is None, f"the C++ extension did not build: {reason}"
    return torch.ops.torch_medloss.label_histogram


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root, with ``env`` added to the environment."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# ------------------------------------------------------------------------------------------- reference, by hand


def test_reference_hand_counts():
    labels = torch.tensor([[0, 1, 1, 2, -100, 5, -1], [2, 2, 2, 0, 0, -100, -100]])
    expected = torch.tensor([[1, 2, 1, 2], [2, 0, 3, 0]])  # last column: 5 and -1 are invalid
    assert torch.equal(reference(labels, 3, -100), expected)


def test_reference_ignore_index_inside_the_classes():
    labels = torch.tensor([[[0, 1], [1, 2]], [[1, 1], [3, 0]]])  # (2, 2, 2)
    # ignore_index=1 is a class: its column stays 0; 3 is invalid.
    assert torch.equal(reference(labels, 3, 1), torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1]]))


def test_reference_uint8_does_not_wrap_ignore_index():
    labels = torch.tensor([[0, 156, 255, 1]], dtype=torch.uint8)  # -100 wraps to 156 as uint8
    assert torch.equal(reference(labels, 2, -100), torch.tensor([[1, 1, 2]]))
    assert torch.equal(reference(labels, 2, 255), torch.tensor([[1, 1, 1]]))


def test_public_function_docstring_example():
    labels = torch.tensor([[[0, 1], [1, -100]], [[2, 2], [2, 0]]])
    counts = label_histogram(labels, num_classes=3, backend="reference")
    assert counts.dtype == torch.int64
    assert torch.equal(counts, torch.tensor([[1, 2, 0], [1, 0, 3]]))
    assert torch.equal(label_histogram(labels, num_classes=3, batch=True), torch.tensor([2, 2, 3]))


# ---------------------------------------------------------------------------------------- C++ (CPU) kernel


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_classes", CASES, ids=str)
def test_cpp_matches_reference(cpp_op, dtype, shape, num_classes):
    ignore_index = IGNORE_INDICES[len(shape) % len(IGNORE_INDICES)]
    labels = random_labels(shape, dtype, num_classes, ignore_index)
    flat = labels.reshape(shape[0], -1)
    got, expected = cpp_op(flat, num_classes, ignore_index), reference(labels, num_classes, ignore_index)
    assert got.shape == (shape[0], num_classes + 1) and got.dtype == torch.int64 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int64], ids=str)
def test_cpp_ignore_index(cpp_op, dtype, ignore_index):
    labels = random_labels((3, 31, 5), dtype, 4, ignore_index, seed=ignore_index % 7)
    expected = reference(labels, 4, ignore_index)
    torch.testing.assert_close(cpp_op(labels.flatten(1), 4, ignore_index), expected, rtol=0, atol=0)


def test_cpp_invalid_label_column(cpp_op):
    labels = torch.tensor([[0, 9, -5, 1, 2**40], [3, 3, -100, 1, 0]])
    assert torch.equal(cpp_op(labels, 3, -100), torch.tensor([[1, 1, 0, 3], [1, 1, 0, 2]]))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x[:, ::3], id="pixel-stride-3"),
        pytest.param(lambda x: x[::2], id="batch-stride-2"),
        pytest.param(lambda x: x.t().contiguous().t(), id="transposed-storage"),
        pytest.param(lambda x: x[:, :1].expand(-1, 40), id="pixel-stride-0"),
    ],
)
def test_cpp_strided_2d_input(cpp_op, make):
    labels = make(random_labels((6, 60), torch.int32, 5, -100))
    torch.testing.assert_close(cpp_op(labels, 5, -100), reference(labels, 5, -100), rtol=0, atol=0)


def test_cpp_empty(cpp_op):
    for shape in [(0, 5), (3, 0)]:
        got = cpp_op(torch.empty(shape, dtype=torch.int64), 4, -100)
        assert torch.equal(got, torch.zeros(shape[0], 5, dtype=torch.int64))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(5, dtype=torch.int64), 3, -100), r"labels must be 2-D \(B, N\), got shape \[5\]"),
        ((torch.zeros(2, 5), 3, -100), "labels must be uint8, int8, int16, int32 or int64, got Float"),
        ((torch.zeros(2, 5, dtype=torch.bool), 3, -100), "labels must be uint8, int8, int16, int32 or int64, got Bool"),
        ((torch.zeros(2, 5, dtype=torch.int64), 0, -100), "num_classes must be >= 1, got 0"),
    ],
)
def test_cpp_op_checks(cpp_op, args, match):
    with pytest.raises(RuntimeError, match=match):
        cpp_op(*args)


def test_cpp_opcheck(cpp_op):
    for labels, num_classes, ignore_index in [
        (random_labels((2, 33), torch.int64, 4, -1), 4, -1),
        (random_labels((3, 40), torch.uint8, 6, 255)[:, ::2], 6, 255),
        (torch.empty(0, 7, dtype=torch.int16), 3, -100),
    ]:
        torch.library.opcheck(cpp_op.default, (labels, num_classes, ignore_index))


def test_fake_kernel(cpp_op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        counts = cpp_op(torch.empty(4, 9, dtype=torch.uint8), 6, -100)
        assert counts.shape == (4, 7) and counts.dtype == torch.int64
        with pytest.raises(ValueError, match=r"labels must be 2-D \(B, N\), got shape \(4, 3, 3\)"):
            cpp_op(torch.empty(4, 3, 3, dtype=torch.uint8), 6, -100)
        with pytest.raises(TypeError, match="labels must be one of uint8, .* got torch.float32"):
            cpp_op(torch.empty(4, 9), 6, -100)


def test_compile_fullgraph(cpp_op):
    def per_class_fraction(labels):
        counts = cpp_op(labels.flatten(1), 4, -100)[:, :4]
        return counts / counts.sum(1, keepdim=True)

    labels = random_labels((2, 5, 7), torch.int64, 4, -100, invalid=False)
    compiled = torch.compile(per_class_fraction, fullgraph=True)
    torch.testing.assert_close(compiled(labels), per_class_fraction(labels))


# ------------------------------------------------------------------------------------------- public function


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_classes", CASES[:6], ids=str)
@pytest.mark.parametrize("batch", [False, True])
def test_public_cpp_matches_reference(cpp_op, dtype, shape, num_classes, batch):
    labels = random_labels(shape, dtype, num_classes, -100, invalid=False)
    expected = reference(labels, num_classes, -100)[:, :num_classes]
    got = label_histogram(labels, num_classes, batch=batch, backend="cpp")
    torch.testing.assert_close(got, expected.sum(0) if batch else expected, rtol=0, atol=0)


# (make, copied): layouts the public function reads in place, and the ones it copies once.
LAYOUTS = [
    pytest.param(lambda x: x.permute(0, 2, 3, 1), False, id="permuted-spatial"),
    pytest.param(lambda x: x.contiguous(memory_format=torch.channels_last), False, id="channels_last"),
    pytest.param(lambda x: x[1:3], False, id="batch-slice"),
    pytest.param(lambda x: x[:, :1, :1, :1].expand(-1, 4, 5, 6), False, id="expanded"),
    pytest.param(lambda x: x.permute(1, 0, 2, 3), True, id="batch-inside-pixels"),
    pytest.param(lambda x: x[:, :, ::2, 1:], True, id="sliced-pixels"),
]


@pytest.mark.parametrize("make, copied", LAYOUTS)
def test_non_contiguous_layouts(cpp_op, make, copied):
    labels = make(random_labels((4, 3, 5, 6), torch.int16, 5, -100, invalid=False))
    flat = _flatten_pixels(labels)
    assert flat.shape == (labels.shape[0], labels[0].numel())
    assert (flat.untyped_storage().data_ptr() != labels.untyped_storage().data_ptr()) == copied
    expected = reference(labels, 5, -100)[:, :5]
    for backend in ("cpp", "reference"):
        torch.testing.assert_close(label_histogram(labels, 5, backend=backend), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_public_empty_returns_zeros(cpp_op, backend):
    for shape in [(0, 5), (2, 0), (2, 3, 0, 4)]:
        labels = torch.empty(shape, dtype=torch.uint8)
        assert torch.equal(label_histogram(labels, 3, backend=backend), torch.zeros(shape[0], 3, dtype=torch.int64))
        assert torch.equal(label_histogram(labels, 3, batch=True, backend=backend), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_public_invalid_labels_raise(cpp_op, backend):
    labels = torch.tensor([[[0, 1], [7, -100]], [[-1, 2], [2, 7]]], dtype=torch.int8)
    message = r"labels must be class indices in \[0, 3\) or ignore_index=-100; found 3 pixel\(s\) .* values: -1, 7\."
    with pytest.raises(ValueError, match=message):
        label_histogram(labels, 3, backend=backend)
    many = torch.arange(-20, 20).reshape(2, 20)
    with pytest.raises(ValueError, match=r"values: -20, -19, -18, -17, -16, -15, -14, -13 and 29 more\."):
        label_histogram(many, 3, ignore_index=-100, backend=backend)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"labels": torch.zeros(2, 3)}, TypeError, r"labels must be an integer tensor .* got torch.float32"),
        ({"labels": torch.zeros(2, 3, dtype=torch.bool)}, TypeError, "labels must be an integer tensor .* torch.bool"),
        ({"labels": [[0, 1]]}, TypeError, "labels must be a torch.Tensor, got list"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, ValueError, r"labels must have shape \(B, \*spatial\)"),
        ({"num_classes": 2.0}, TypeError, r"num_classes must be an int, got float \(2.0\)"),
        ({"num_classes": True}, TypeError, r"num_classes must be an int, got bool"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
        ({"ignore_index": 0.5}, TypeError, r"ignore_index must be an int, got float \(0.5\)"),
        ({"ignore_index": 2**64}, ValueError, "ignore_index must fit in int64"),
        ({"batch": 1}, TypeError, r"batch must be a bool, got int \(1\)"),
        ({"backend": "fast"}, ValueError, r"backend must be one of \('auto', .*got 'fast'"),
        ({"backend": None}, TypeError, "backend must be a str"),
        ({"backend": "cuda"}, ValueError, "backend='cuda' cannot run label_histogram: .*CUDA tensors, got cpu"),
    ],
)
def test_public_argument_errors(kwargs, error, match):
    arguments = {"labels": torch.zeros(2, 3, dtype=torch.int64), "num_classes": 2, **kwargs}
    with pytest.raises(error, match=match):
        label_histogram(**arguments)


@pytest.mark.skipif(not hasattr(torch, "uint16"), reason="torch has no uint16")
def test_public_rejects_uint16():
    with pytest.raises(TypeError, match="labels must be an integer tensor of class indices, one of uint8, "):
        label_histogram(torch.zeros(2, 3, dtype=torch.uint16), 2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter lets triton run on CPU")
def test_public_triton_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend='triton' cannot run label_histogram: Triton kernels need CUDA"):
        label_histogram(torch.zeros(2, 3, dtype=torch.int64), 2, backend="triton")


# ------------------------------------------------------------------------------------------------- fallback


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "why_not_loaded", lambda cuda: "no C++ compiler found")
    monkeypatch.setattr(_backend, "_warned", set())
    labels = random_labels((2, 9, 4), torch.int32, 3, -100, invalid=False)
    expected = r"label_histogram falls back from the cpp backend to the reference: no C\+\+ compiler"
    with pytest.warns(UserWarning, match=expected) as seen:
        first = label_histogram(labels, 3)
        second = label_histogram(labels, 3)
    assert len([w for w in seen if "falls back" in str(w.message)]) == 1
    expected = reference(labels, 3, -100)[:, :3]
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_named_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(_extension, "why_not_loaded", lambda cuda: "no C++ compiler found")
    with pytest.raises(ValueError, match=r"backend='cpp' cannot run label_histogram: no C\+\+ compiler found"):
        label_histogram(torch.zeros(2, 3, dtype=torch.int64), 2, backend="cpp")


def test_no_build_env_var_and_clean_import():
    """TORCH_MEDLOSS_NO_BUILD=1 disables the extension; importing the package builds nothing and imports no triton."""
    result = run_python(
        """
        import sys, warnings
        import torch, torch_medloss
        from torch_medloss import _extension
        assert _extension._outcome is None, "the import built or loaded the extension"
        assert "triton" not in sys.modules and not torch.cuda.is_initialized()
        print(_extension.why_not_loaded(cuda=False))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            counts = torch_medloss.functional.label_histogram(torch.tensor([[0, 1, 1]]), 2)
        assert counts.tolist() == [[1, 2]], counts
        assert len(seen) == 1 and "falls back from the cpp backend" in str(seen[0].message), seen
        """,
        TORCH_MEDLOSS_NO_BUILD="1",
    )
    assert "TORCH_MEDLOSS_NO_BUILD=1 is set" in result.stdout


# ------------------------------------------------------------------------------------------------- building


def test_build_command_in_process(cpp_op, capsys):
    assert main(["build"]) == 0
    assert "  cpu: yes" in capsys.readouterr().out
    report = _extension.build()
    assert report["cpu"] and Path(report["path"]).exists()
    assert report["cuda"] == (_extension.why_not_loaded(cuda=True) is None)


def test_build_command_runs(cpp_op):
    result = subprocess.run(
        [sys.executable, "-m", "torch_medloss", "build"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  cpu: yes" in result.stdout
    assert "loaded from the cache" in result.stdout, "the cache built by the cpp_op fixture was not reused"


def test_missing_compiler_is_the_reason(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    outcome = _extension._load(verbose=False)
    assert outcome.cpu_reason == "no C++ compiler found ('/nonexistent/c++' is not on PATH; install one or set CXX)"
    assert outcome.cuda_reason == outcome.cpu_reason and outcome.path is None


def test_compiler_error_is_the_reason(monkeypatch, tmp_path):
    broken = tmp_path / "csrc"
    shutil.copytree(_extension.source_dir(), broken)
    with open(broken / "cpu" / "label_histogram_kernel.cpp", "a") as source:
        source.write('\n#error "deliberately broken"\n')
    monkeypatch.setattr(_extension, "source_dir", lambda: broken)
    monkeypatch.setattr(_extension, "_cuda_reason", lambda: "built without CUDA: not in this test")
    monkeypatch.setenv("TORCH_MEDLOSS_CACHE", str(tmp_path / "cache"))
    outcome = _extension._load(verbose=False)
    assert outcome.cpu_reason.startswith(f"compiling {tmp_path / 'cache'}"), outcome.cpu_reason
    assert "deliberately broken" in outcome.cpu_reason and outcome.path is None
    assert not list((tmp_path / "cache").glob("*/built.ok"))


def test_build_command_without_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- Triton


@TRITON
@KERNELS
def test_triton_interpreted_matches_reference():
    """The Triton kernel under TRITON_INTERPRET=1 on tiny shapes: every dtype, strides, two class tiles, empty."""
    run_python(
        """
        import torch
        from torch_medloss.kernels.label_histogram import label_histogram_triton
        from torch_medloss.label_histogram import LABEL_DTYPES, label_histogram
        from torch_medloss.reference.label_histogram import label_histogram as reference

        generator = torch.Generator().manual_seed(0)
        for dtype in LABEL_DTYPES:
            low = 0 if dtype == torch.uint8 else -3
            # (B, N), C, ignore_index: one pixel, odd sizes, more than one 256-pixel step, C + 1 > 32 (two tiles).
            for (batch, pixels), num_classes, ignore_index in [
                ((1, 1), 1, 0), ((2, 37), 3, -100), ((3, 300), 5, 2), ((2, 77), 40, 7),
            ]:
                labels = torch.randint(low, num_classes + 3, (batch, 2 * pixels), generator=generator).to(dtype)
                for view in (labels[:, :pixels], labels[:, ::2], labels[::2]):
                    got = label_histogram_triton(view, num_classes, ignore_index)
                    expected = reference(view, num_classes, ignore_index)
                    assert torch.equal(got, expected), (dtype, view.shape, got, expected)

        empty = label_histogram_triton(torch.empty(2, 0, dtype=torch.uint8), 3, -100)
        assert torch.equal(empty, torch.zeros(2, 4, dtype=torch.int64))

        labels = torch.randint(0, 4, (2, 5, 3, 7), generator=generator).permute(0, 3, 1, 2)
        got = label_histogram(labels, 4, backend="triton", batch=True)
        assert torch.equal(got, reference(labels, 4, -100)[:, :4].sum(0)), got

        # The interpreter runs kernels eagerly (wrap_triton returns them unwrapped), so only the checks that do not
        # trace through the kernel apply; the CUDA test runs the full opcheck.
        torch.library.opcheck(
            torch.ops.torch_medloss.label_histogram_triton.default,
            (torch.randint(-1, 5, (2, 33), generator=generator), 4, -1),
            test_utils=("test_schema", "test_faketensor"),
        )
        """,
        TRITON_INTERPRET="1",
    )


# ---------------------------------------------------------------------------------------------------- CUDA


GPU_BACKENDS = ["cuda", pytest.param("triton", marks=[TRITON, KERNELS])]


@CUDA
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_classes", [*CASES, ((2, 3, 1000), 7000)], ids=str)
def test_cuda_matches_reference(backend, dtype, shape, num_classes):
    ignore_index = IGNORE_INDICES[len(shape) % len(IGNORE_INDICES)]
    labels = random_labels(shape, dtype, num_classes, ignore_index).cuda()
    flat = labels.reshape(shape[0], -1)
    if backend == "cuda":
        assert _extension.why_not_loaded(cuda=True) is None  # builds or loads the op
        op = torch.ops.torch_medloss.label_histogram
    else:
        from torch_medloss.kernels.label_histogram import label_histogram_triton as op
    for view in (flat, flat[:, ::2]):
        expected = reference(view, num_classes, ignore_index)
        torch.testing.assert_close(op(view, num_classes, ignore_index), expected, rtol=0, atol=0)


@CUDA
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_deterministic_and_public(backend):
    """The CUDA kernel adds with atomics: integer sums must still repeat exactly, on a large image."""
    labels = random_labels((2, 64, 64, 33), torch.uint8, 5, 255, invalid=False).cuda()
    first = label_histogram(labels, 5, ignore_index=255, backend=backend)
    for _ in range(3):
        assert torch.equal(label_histogram(labels, 5, ignore_index=255, backend=backend), first)
    torch.testing.assert_close(first.cpu(), reference(labels.cpu(), 5, 255)[:, :5], rtol=0, atol=0)
    channels_last = labels.contiguous(memory_format=torch.channels_last)
    assert torch.equal(label_histogram(channels_last, 5, ignore_index=255, backend=backend), first)


@CUDA
@TRITON
@KERNELS
def test_cuda_opcheck_and_compile():
    assert _extension.why_not_loaded(cuda=True) is None
    from torch_medloss.kernels.label_histogram import label_histogram_triton

    labels = random_labels((3, 50), torch.int32, 4, -100).cuda()
    for op in (torch.ops.torch_medloss.label_histogram, torch.ops.torch_medloss.label_histogram_triton):
        torch.library.opcheck(op.default, (labels, 4, -100))
        torch.library.opcheck(op.default, (labels[:, ::2], 4, -100))

    def counts(labels):
        return label_histogram_triton(labels, 4, -100)[:, :4].sum(0)

    torch.testing.assert_close(torch.compile(counts, fullgraph=True)(labels), counts(labels))
