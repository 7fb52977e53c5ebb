"""The fused DBCE loss op (``torch_medloss::dbce_loss_fwd`` / ``_bwd``: the masks, the class weights of each unit,
the weighted cross entropy and the reduction in one op) against its reference, torch_medloss.reference.dbce_ops
.dbce_loss_fwd, on the C++ CPU kernels.

The op is called as the losses call it: logits (B, C, S), labels (B, D, H, W) (1-D and 2-D maps with leading size-1
dims), the codes and scalars of torch_medloss._contract; values and gradients under one random upstream gradient,
every reduction, batch units, ball and cube, 1-D to 3-D, bad labels and empty inputs. The pieces (dbce_masks,
dbce_ce) have their own tests (test_dbce_cpp.py); the Triton op has test_dbce_triton.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import backends
import pytest
import torch

from torch_medloss import _contract as K
from torch_medloss.reference import dbce_ops as reference

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CPP_CHUNK = 8192  # csrc/cpu/dbce_kernel.cpp's cross-entropy chunk: longer images are summed from several rows
ANISOTROPIC = (2.0, 1.0, 0.7)


@pytest.fixture(params=backends.params("cpp"))
def backend(request):
    backends.require(request.param)
    import torch_medloss.ops.dbce  # noqa: F401  (the fake kernels and autograd of the C++ ops)

    return request.param


# ---------------------------------------------------------------------------------------------------- case builders


def codes(element=K.ELEMENT_BALL, batch=False, reduction=K.REDUCTION_MEAN, ignore_index=-100) -> list[int]:
    values = [0] * K.DBCE_NUM_CODES
    values[K.DBCE_CODE_ELEMENT] = element
    values[K.DBCE_CODE_BATCH] = int(batch)
    values[K.DBCE_CODE_REDUCTION] = reduction
    values[K.DBCE_CODE_IGNORE_INDEX] = ignore_index
    return values


def scalars(radius=2.0, spacing=(1.0, 1.0, 1.0)) -> list[float]:
    return [float(radius), *(float(s) for s in spacing)]


def make_labels(shape, classes, generator, dtype=torch.int64, ignore_index=-100, invalid=False):
    """Labels (B, D, H, W): blocky regions (so that the dilation matters), ~15% ignore_index where the dtype holds it,
    class 1 absent for C >= 3, and with ``invalid`` a few labels outside [0, C)."""
    batch, *spatial = shape
    coarse = [max(1, math.ceil(n / 3)) for n in spatial]
    field = torch.randint(0, classes, (batch, 1, *coarse), generator=generator).double()
    labels = torch.nn.functional.interpolate(field, size=spatial, mode="nearest")[:, 0].long()
    scatter = torch.rand(shape, generator=generator) < 0.1
    labels[scatter] = torch.randint(0, classes, (int(scatter.sum()),), generator=generator)
    if classes >= 3:
        labels[labels == 1] = 0
    info = torch.iinfo(dtype)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(shape, generator=generator) < 0.15] = ignore_index
    if invalid:
        labels.view(-1)[3::11] = classes
    return labels.to(dtype)


def volume(spatial, batch=2):
    """(B, D, H, W) of a 1-D, 2-D or 3-D image."""
    return (batch, *([1] * (3 - len(spatial))), *spatial)


def make_logits(batch, classes, pixels, dtype, generator):
    return (3 * torch.randn(batch, classes, pixels, generator=generator, dtype=torch.float64)).to(dtype)


def op(name):
    return getattr(torch.ops.torch_medloss, name)


def run(backend, logits, labels, cds, scl, upstream=None):
    """(loss, d<upstream, loss>/d logits) of the loss op on ``backend`` (the reference's op on "reference")."""
    leaf = logits.detach().clone().requires_grad_(True)
    if backend == "reference":
        loss = reference.dbce_loss_fwd(leaf, labels, cds, scl)
    else:
        loss = op("dbce_loss_fwd")(leaf, labels, cds, scl)[0]
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf, allow_unused=True)
    return loss.detach(), (torch.zeros_like(leaf) if grad is None else grad)


def check(backend, logits, labels, cds, scl, generator, what=""):
    """Value and gradient against the reference on the same values (low precision upcast to float32, as the kernels
    accumulate), under a random upstream gradient and with the loss scaled by 2."""
    shape = K.dbce_loss_shape(logits.shape[0], logits.shape[2], cds)
    upstream = torch.rand(shape, generator=generator, dtype=torch.float64)
    wide = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    rtol = RTOL[logits.dtype]
    for scale in (1.0, 2.0):
        got = run(backend, logits, labels, cds, scl, scale * upstream)
        want = run("reference", wide, labels, cds, scl, scale * upstream)
        assert got[0].shape == want[0].shape, f"{what}: shape {tuple(got[0].shape)} != {tuple(want[0].shape)}"
        for name, g, w in zip(("loss", "gradient"), got, want, strict=True):
            g = g.to(w.dtype)
            finite = w[torch.isfinite(w)]
            bound = max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * bound, equal_nan=True,
                                       msg=lambda m, n=name: f"{what} {n}: {m}")
    return got


# ------------------------------------------------------------------------------------------- against the reference

REDUCTIONS = [K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("element", [K.ELEMENT_BALL, K.ELEMENT_CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("spatial", [(37,), (9, 11), (5, 6, 7)], ids=["1d", "2d", "3d"])
def test_loss_matches_reference(backend, spatial, element, batch, reduction, dtype):
    generator = torch.Generator().manual_seed(len(spatial) * 100 + element * 10 + reduction + 3 * batch)
    labels = make_labels(volume(spatial), 4, generator)
    logits = make_logits(2, 4, math.prod(spatial), dtype, generator)
    for radius, spacing in ((0.0, (1.0, 1.0, 1.0)), (1.5, (1.0, 1.0, 1.0)), (2.5, ANISOTROPIC)):
        check(backend, logits, labels, codes(element, batch, reduction), scalars(radius, spacing), generator,
              f"R {radius}, spacing {spacing}")


def test_hand_computed_balanced_ce(backend):
    """R = 0 on one 1-D image: w_c = N / (K |M_c|), the mean sum w CE / sum w, by hand."""
    logits = torch.tensor([[[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 3.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1]).view(1, 1, 1, 4)  # N = 4, K = 2: w_0 = 4 / 2 = 2, w_1 = 4 / 6
    loss, masks, class_weights, norm = op("dbce_loss_fwd")(logits, labels, codes(), scalars(0.0))
    ce = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(-3.0)),
          math.log1p(math.exp(1.0))]
    weights = [2.0, 2.0 / 3, 2.0 / 3, 2.0 / 3]
    total = sum(w * c for w, c in zip(weights, ce, strict=True))
    assert torch.equal(class_weights, torch.tensor([[2.0, 2.0 / 3]], dtype=torch.float64))
    assert torch.equal(masks, torch.tensor([[1, 2, 2, 2]], dtype=torch.uint8))
    torch.testing.assert_close(loss, torch.tensor(total / sum(weights), dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(norm, torch.tensor([1 / sum(weights)], dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bad_labels_make_the_loss_nan_and_keep_the_gradient(backend, reduction):
    generator = torch.Generator().manual_seed(5 + reduction)
    labels = make_labels(volume((6, 7)), 3, generator, invalid=True)
    logits = make_logits(2, 3, 42, torch.float32, generator)
    cds, scl = codes(reduction=reduction, batch=reduction == K.REDUCTION_SUM), scalars(1.0)
    loss, grad = run(backend, logits, labels, cds, scl)
    assert torch.isnan(loss).all() and torch.isfinite(grad).all()
    check(backend, logits, labels, cds, scl, generator, "bad labels")


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty(backend, shape, reduction):
    labels = torch.zeros(shape, dtype=torch.int64)
    logits = torch.randn(shape[0], 3, math.prod(shape[1:]))
    cds = codes(reduction=reduction)
    loss, grad = run(backend, logits, labels, cds, scalars())
    want, _ = run("reference", logits, labels, cds, scalars())
    assert loss.shape == want.shape and grad.shape == logits.shape
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_logits(backend, dtype):
    generator = torch.Generator().manual_seed(7)
    labels = make_labels(volume((5, 6, 7)), 3, generator, dtype=torch.uint8, ignore_index=255)
    logits = make_logits(2, 3, 210, dtype, generator)
    for reduction in REDUCTIONS:
        check(backend, logits, labels, codes(reduction=reduction, ignore_index=255), scalars(1.5), generator, dtype)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 255])
def test_label_dtypes_and_ignore_index(backend, label_dtype, ignore_index):
    """Labels are read at their own dtype and compared as integers: a uint8 map never matches -100, and 255 is an
    invalid label of int64 maps but the ignored one of uint8 maps."""
    generator = torch.Generator().manual_seed(ignore_index % 13)
    labels = make_labels(volume((7, 8)), 3, generator, dtype=label_dtype, ignore_index=ignore_index)
    logits = make_logits(2, 3, 56, torch.float64, generator)
    check(backend, logits, labels, codes(ignore_index=ignore_index, batch=True), scalars(1.0), generator)


@pytest.mark.parametrize("layout", ["channels_last", "strided_labels", "non_mergeable_labels"])
def test_layouts(backend, layout):
    """Logits are read in place through their strides; labels whose spatial dims cannot be flattened into a view
    are copied once for the cross entropy (the masks read them in place)."""
    generator = torch.Generator().manual_seed(11)
    image = 3 * torch.randn(2, 4, 5, 6, 7, generator=generator, dtype=torch.float64)
    labels = make_labels(volume((5, 6, 7)), 4, generator)
    if layout == "channels_last":
        logits = image.contiguous(memory_format=torch.channels_last_3d).flatten(2)
        assert logits.stride(1) == 1
    elif layout == "strided_labels":
        logits = image.flatten(2)
        labels = make_labels(volume((5, 6, 14)), 4, generator)[..., ::2]
    else:
        logits = image.flatten(2)
        labels = labels.transpose(2, 3).contiguous().transpose(2, 3)
    for reduction in REDUCTIONS:
        _, grad = check(backend, logits, labels, codes(reduction=reduction), scalars(2.0, ANISOTROPIC), generator,
                        layout)
        assert grad.stride() == logits.stride()


def test_several_chunks_per_image(backend):
    generator = torch.Generator().manual_seed(13)
    labels = make_labels(volume((20, 21, 22), batch=1), 5, generator)
    logits = make_logits(1, 5, 20 * 21 * 22, torch.float64, generator)
    assert logits.shape[2] > CPP_CHUNK
    for reduction in REDUCTIONS:
        check(backend, logits, labels, codes(K.ELEMENT_CUBE, reduction=reduction), scalars(3.0), generator)


def test_negative_infinite_logit_keeps_the_loss_finite(backend):
    """A masked class (logit -inf) that is never the label: its softmax term is 0, not NaN."""
    generator = torch.Generator().manual_seed(4)
    labels = make_labels(volume((4, 9)), 2, generator)
    logits = torch.cat([make_logits(2, 2, 36, torch.float32, generator), torch.full((2, 1, 36), -math.inf)], 1)
    got = check(backend, logits, labels, codes(), scalars(1.0), generator, "-inf logits")
    assert all(torch.isfinite(t).all() for t in got)


# ------------------------------------------------------------------------------------------------- op machinery


def test_opcheck(backend):
    generator = torch.Generator().manual_seed(0)
    labels = make_labels(volume((3, 4, 5)), 3, generator, dtype=torch.uint8)
    logits = make_logits(2, 3, 60, torch.float32, generator)
    for reduction in REDUCTIONS:
        for x in (logits, logits.transpose(1, 2).contiguous().transpose(1, 2)):
            args = (x.requires_grad_(True), labels, codes(reduction=reduction, batch=True), scalars(1.5))
            torch.library.opcheck(op("dbce_loss_fwd").default, args)
            loss, masks, class_weights, norm = op("dbce_loss_fwd")(*args)
            torch.library.opcheck(op("dbce_loss_bwd").default,
                                  (torch.randn_like(loss), masks, class_weights, norm, x.detach(), *args[1:]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("permuted", [False, True])
def test_gradcheck_float64(backend, seed, permuted):
    generator = torch.Generator().manual_seed(seed)
    labels = make_labels(volume((3, 5)), 3, generator, ignore_index=0)
    logits = make_logits(2, 3, 15, torch.float64, generator)
    if permuted:
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    leaf = logits.requires_grad_(True)
    for reduction in REDUCTIONS:
        cds = codes(reduction=reduction)
        # The weights depend on the labels only: finite differences see the same function.
        assert torch.autograd.gradcheck(lambda x, c=cds: op("dbce_loss_fwd")(x, labels, c, scalars(1.0))[0], (leaf,))


def test_double_backward_is_refused(backend):
    logits = torch.randn(1, 2, 5, requires_grad=True)
    labels = torch.randint(0, 2, (1, 1, 1, 5))
    loss = op("dbce_loss_fwd")(logits, labels, codes(), scalars(1.0))[0]
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()


def test_compile_fullgraph(backend):
    generator = torch.Generator().manual_seed(3)
    labels = make_labels(volume((3, 4, 5)), 3, generator)
    logits = make_logits(2, 3, 60, torch.float32, generator)

    def loss(x):
        return op("dbce_loss_fwd")(x, labels, codes(), scalars(1.5))[0] * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(loss, fullgraph=True)
        leaf = logits.clone().requires_grad_(True)
        value = compiled(leaf)
        (grad,) = torch.autograd.grad(value, leaf)
    want, want_grad = run(backend, logits, labels, codes(), scalars(1.5), torch.tensor(2.0))
    torch.testing.assert_close(value, 2 * want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("change, match", [
    (dict(codes=codes()[:-1]), r"codes must have 4 entries"),
    (dict(scalars=scalars()[:-1]), r"scalars must have 4 entries"),
    (dict(logits=torch.zeros(2, 3)), r"logits must be 3-D \(B, C, S\), got shape \[2, 3\]"),
    (dict(labels=torch.zeros(2, 1, 4, 4, dtype=torch.int64)),
     r"labels must be \(B, D, H, W\) with B = 2 and D H W = S = 20 for logits of shape \[2, 3, 20\], "
     r"got \[2, 1, 4, 4\]"),
    (dict(labels=torch.zeros(2, 1, 4, 5)), "labels must be uint8, int8, int16, int32 or int64, got Float"),
    (dict(codes=codes(reduction=3)),
     r"codes\[DBCE_CODE_REDUCTION\] must be 0 \(mean\), 1 \(sum\) or 2 \(none\), got 3"),
    (dict(codes=codes(element=2)), r"element must be 0 \(ball\) or 1 \(cube\), got 2"),
    (dict(scalars=scalars(radius=-1.0)), "radius must be finite and >= 0, got -1"),
    (dict(scalars=scalars(spacing=(1.0, 0.0, 1.0))), "spacing must be finite and > 0"),
    (dict(logits=torch.zeros(2, 65, 20)), r"num_classes must be in \[1, 64\]"),
], ids=["codes", "scalars", "logits", "labels_shape", "labels_dtype", "reduction", "element", "radius", "spacing",
        "classes"])
def test_op_checks_name_the_argument(backend, change, match):
    args = dict(logits=torch.zeros(2, 3, 20), labels=torch.zeros(2, 1, 4, 5, dtype=torch.int64), codes=codes(),
                scalars=scalars())
    args.update(change)
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_loss_fwd: " + match):
        op("dbce_loss_fwd")(*args.values())
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_loss_bwd: " + match):
        op("dbce_loss_bwd")(torch.zeros(()), torch.zeros(2, 20, dtype=torch.uint8), torch.ones(2, 3), torch.ones(1),
                            *args.values())


# --------------------------------------------------------------------------------------------- the C++ kernels


def _cpp_case():
    """Several cross-entropy chunks per image, a 3-D ball with anisotropic spacing, batch weights."""
    generator = torch.Generator().manual_seed(23)
    labels = make_labels(volume((18, 20, 24)), 5, generator)
    logits = make_logits(2, 5, 18 * 20 * 24, torch.float32, generator)
    return logits, labels


def _cpp_outputs(logits, labels):
    """The forward's outputs and the gradient of every reduction."""
    outputs = []
    generator = torch.Generator().manual_seed(24)
    for reduction in REDUCTIONS:
        cds, scl = codes(batch=reduction != K.REDUCTION_SUM, reduction=reduction), scalars(2.5, ANISOTROPIC)
        outputs += op("dbce_loss_fwd")(logits, labels, cds, scl)
        shape = K.dbce_loss_shape(logits.shape[0], logits.shape[2], cds)
        outputs += run("cpp", logits, labels, cds, scl, torch.rand(shape, generator=generator))
    return outputs


def test_cpp_deterministic_and_thread_count_independent(backend):
    case = _cpp_case()
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append(_cpp_outputs(*case))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for got, first in zip(result, results[0], strict=True):
            assert torch.equal(got, first), f"differs by {(got.double() - first.double()).abs().max().item()}"


_ISA_SCRIPT = """
import sys
import torch
from torch_medloss import _extension
import torch_medloss.ops.dbce  # noqa: F401  (the autograd of the C++ ops)

sys.path.insert(0, sys.argv[2])
import test_dbce_loss as t

assert _extension.why_not_loaded(cuda=False) is None
torch.save((torch.backends.cpu.get_cpu_capability(), t._cpp_outputs(*t._cpp_case())),
           sys.argv[1] + "/" + sys.argv[3] + ".pt")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_instruction_sets_agree(backend, capability, tmp_path):
    """The cross entropy's float32 tasks are compiled for the baseline, AVX2 and AVX-512 and picked at run time
    (ATEN_CPU_CAPABILITY caps the choice, once per process): the same results within float32 rounding, the masks and
    class weights bitwise."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path), str(Path(__file__).parent), capability],
                   env=env, check=True, timeout=600)
    used, got = torch.load(tmp_path / f"{capability}.pt")
    assert used == capability.upper() or (capability == "avx2" and used == "DEFAULT"), used
    here = _cpp_outputs(*_cpp_case())
    for index, (g, h) in enumerate(zip(got, here, strict=True)):
        if not h.is_floating_point() or index % 6 in (2, 3):  # masks, class weights, norm: exact
            assert torch.equal(g, h) or (index % 6 == 3 and torch.allclose(g, h, rtol=1e-6)), index
        else:
            torch.testing.assert_close(g, h, rtol=RTOL[torch.float32], atol=RTOL[torch.float32] * h.abs().max().item())
