"""The fused DBCE path (dbce_masks + weighted CE + head) against the reference, over the options.

``OPS_BACKENDS`` lists the op implementations to run the head on: "reference" (the PyTorch contract, always) and
"cpp" when the C++ DBCE ops are built. Triton runs under the interpreter in test_dbce_triton.py; CUDA on a GPU.
"""

import pytest
import torch

from helpers import assert_same_loss
from torch_medloss import _extension, dbce_family
from torch_medloss.reference import dbce as reference


def _cpp_dbce_built() -> bool:
    return _extension.why_not_loaded(cuda=False) is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "torch_medloss::dbce_ce_fwd", "CPU")


OPS_BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not _cpp_dbce_built(),
                                                                         reason="the C++ DBCE ops are not built"))]


def labels_case(shape, num_classes, seed=0, ignore=True):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=generator)
    if ignore:
        labels.view(-1)[:3] = -100
    return labels


@pytest.mark.parametrize("ops_backend", OPS_BACKENDS)
@pytest.mark.parametrize("spatial, radius, element, spacing, batch", [
    ((11,), 2.0, "ball", None, False),
    ((6, 7), 1.5, "ball", None, True),
    ((6, 7), 2.0, "cube", (1.0, 2.0), False),
    ((4, 5, 6), 1.8, "ball", (0.7, 1.0, 1.3), False),
    ((4, 5, 6), 1.0, "cube", None, True),
    ((5, 5), 0.0, "ball", None, False),
])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dbce_matches_reference(ops_backend, spatial, radius, element, spacing, batch, reduction):
    num_classes = 4
    labels = labels_case((2, *spatial), num_classes)
    logits = torch.randn(2, num_classes, *spatial, dtype=torch.float64)
    options = dict(radius=radius, element=element, spacing=spacing, batch=batch, reduction=reduction)
    assert_same_loss(lambda x, y: dbce_family.dbce_loss(x, y, backend=ops_backend, **options),
                     lambda x, y: reference.dbce_loss(x, y, **options), logits, labels, 1e-10, 1e-12)


@pytest.mark.parametrize("ops_backend", OPS_BACKENDS)
@pytest.mark.parametrize("batch", [False, True])
def test_weights_match_reference(ops_backend, batch):
    labels = labels_case((2, 5, 6, 7), 5)
    labels[1][labels[1] == 3] = 0  # class 3 absent from image 1
    got = dbce_family.dilated_class_weights(labels, 5, 1.5, "ball", (1.0, 1.0, 2.0), batch, backend=ops_backend)
    expected = reference.dilated_class_weights(labels, 5, 1.5, "ball", (1.0, 1.0, 2.0), batch)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ops_backend", OPS_BACKENDS)
def test_all_ignored_gives_zero(ops_backend):
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 4, 4), -100)
    loss = dbce_family.dbce_loss(logits, labels, backend=ops_backend)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("ops_backend", OPS_BACKENDS)
def test_invalid_labels_give_nan(ops_backend):
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    labels = labels_case((1, 4, 4), 3, ignore=False)
    labels[0, 0, 0] = 9
    assert torch.isnan(dbce_family.dbce_loss(logits, labels, backend=ops_backend))


def test_blockers():
    assert dbce_family.fusion_blocker(torch.randn(1, 65, 4), None) is not None
    assert dbce_family.fusion_blocker(torch.randn(1, 3, 2, 2, 2, 2), None) is not None
    assert dbce_family.fusion_blocker(torch.randn(1, 64, 4, 4), None) is None


def test_triton_losses_under_the_interpreter():
    """DBCELoss, BalancedCELoss and dilated_class_weights with backend="triton" equal the reference."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, torch_medloss
        from torch_medloss import functional as F
        torch.manual_seed(0)
        logits = torch.randn(2, 3, 5, 6, requires_grad=True)
        labels = torch.randint(0, 3, (2, 5, 6))
        labels[0, 0, :2] = -100
        for cls, kw in [(torch_medloss.DBCELoss, dict(radius=1.5)), (torch_medloss.DBCELoss, dict(element="cube",
                        batch=True, reduction="sum")), (torch_medloss.BalancedCELoss, dict(reduction="none"))]:
            values = [cls(backend=b, **kw)(logits, labels) for b in ("triton", "reference")]
            grads = [torch.autograd.grad(v.sum(), logits)[0] for v in values]
            torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
        got = F.dilated_class_weights(labels, 3, 2.0, backend="triton")
        expected = F.dilated_class_weights(labels, 3, 2.0, backend="reference")
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(not _cpp_dbce_built(), reason="the C++ DBCE ops are not built")
def test_auto_uses_cpp_and_compiles_fullgraph():
    import torch_medloss

    model = torch.nn.Conv2d(2, 3, 3, padding=1)
    loss_fn = torch_medloss.DBCELoss(radius=2.0)
    images, labels = torch.randn(2, 2, 8, 8), torch.randint(0, 3, (2, 8, 8))
    compiled = torch.compile(lambda x, y: loss_fn(model(x), y), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images, labels), loss_fn(model(images), labels))
    reference = torch_medloss.DBCELoss(radius=2.0, backend="reference")(model(images), labels)
    torch.testing.assert_close(loss_fn(model(images), labels), reference)
