"""The fused Dice-family losses end to end: gradcheck, dtypes, layouts, determinism, torch.compile, Triton e2e."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_medloss
from torch_medloss import _extension
from torch_medloss import functional as F


@pytest.fixture(scope="module", autouse=True)
def _needs_the_extension():
    """Skips the module when the C++ extension is not built: decided when its first test runs, so that collecting
    the tests never builds."""
    if _extension.why_not_loaded(cuda=False) is not None:
        pytest.skip("the C++ extension is not built")


LOSSES = {
    "dice": lambda x, y, b: F.dice_loss(x, y, to_onehot_y=True, softmax=True, backend=b),
    "dice_squared_batch_jaccard": lambda x, y, b: F.dice_loss(x, y, to_onehot_y=True, softmax=True, batch=True,
                                                              squared_pred=True, jaccard=True, backend=b),
    "pm_dice_gamma0_sigmoid": lambda x, y, b: F.pm_dice_loss(x, y, gamma=0.0, to_onehot_y=True, sigmoid=True,
                                                             reduction="none", backend=b),
    "generalized_dice": lambda x, y, b: F.generalized_dice_loss(x, y, to_onehot_y=True, softmax=True, backend=b),
    "tversky": lambda x, y, b: F.tversky_loss(x, y, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7, backend=b),
    "dice_ce": lambda x, y, b: F.dice_ce_loss(x, y, to_onehot_y=True, softmax=True, label_smoothing=0.1, backend=b),
    "dice_ignore": lambda x, y, b: F.dice_loss(x, y, to_onehot_y=True, softmax=True, ignore_index=1, backend=b),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_cpp(name, permuted, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=generator)
    if permuted:
        logits = logits.contiguous(memory_format=torch.channels_last)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, labels, "cpp"), (logits,), eps=1e-6, atol=1e-7)


def test_pm_dice_gradient_matches_reference_for_gamma_two():
    """gamma > 0: the stop-gradient modulator cannot be gradchecked; compare with the reference's autograd."""
    logits = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 1, 5, 6))
    grads = []
    for backend in ("cpp", "reference"):
        loss = F.pm_dice_loss(logits, labels, gamma=[2.0, 1.0, 0.5, 3.0], to_onehot_y=True, softmax=True,
                              backend=backend)
        grads.append(torch.autograd.grad(loss, logits)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["dice", "dice_ce", "generalized_dice"])
def test_half_precision_error_is_small(name, dtype):
    """The fused loss in half precision is as close to the float64 truth as the reference in half precision."""
    logits = (torch.randn(2, 4, 16, 16) * 3).to(dtype)
    labels = torch.randint(0, 4, (2, 1, 16, 16))
    truth = LOSSES[name](logits.double(), labels, "reference")
    fused_error = (LOSSES[name](logits, labels, "cpp").double() - truth).abs()
    reference_error = (LOSSES[name](logits, labels, "reference").double() - truth).abs()
    assert fused_error <= 4 * reference_error + 1e-6


def test_fused_gradient_keeps_channels_last_layout():
    logits = torch.randn(2, 3, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    labels = torch.randint(0, 3, (2, 1, 6, 5))
    F.dice_loss(logits, labels, to_onehot_y=True, softmax=True, backend="cpp").backward()
    assert logits.grad.is_contiguous(memory_format=torch.channels_last)
    expected = torch.autograd.grad(F.dice_loss(logits.detach().contiguous().requires_grad_(True), labels,
                                               to_onehot_y=True, softmax=True, backend="reference"),
                                   [logits], allow_unused=True)
    reference_logits = logits.detach().contiguous().requires_grad_(True)
    F.dice_loss(reference_logits, labels, to_onehot_y=True, softmax=True, backend="reference").backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-7)
    del expected


@pytest.mark.parametrize("name", ["dice", "dice_ce", "pm_dice_gamma0_sigmoid"])
def test_bitwise_deterministic(name):
    logits = torch.randn(2, 5, 40, 33, requires_grad=True)
    labels = torch.randint(0, 5, (2, 1, 40, 33))
    runs = []
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        loss = LOSSES[name](logits, labels, "cpp")
        runs.append((loss.detach().clone(), torch.autograd.grad(loss.sum(), logits)[0]))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_torch_compile_fullgraph_model_and_loss():
    model = torch.nn.Conv2d(2, 4, 3, padding=1)
    loss_fn = torch_medloss.DiceCELoss(to_onehot_y=True, softmax=True, backend="cpp")

    def step(images, labels):
        return loss_fn(model(images), labels)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    images, labels = torch.randn(2, 2, 8, 8), torch.randint(0, 4, (2, 1, 8, 8))
    loss = compiled(images, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = step(images, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make", [
    lambda: torch_medloss.PMDiceLoss(gamma=[0.0, 1.0, 2.0, 3.0], to_onehot_y=True, softmax=True, backend="cpp"),
    lambda: torch_medloss.DiceCELoss(to_onehot_y=True, softmax=True, weight=[1.0, 2.0, 3.0, 4.0], backend="cpp"),
    lambda: torch_medloss.FocalLoss(to_onehot_y=True, use_softmax=True, backend="cpp"),
    lambda: torch_medloss.DBCELoss(radius=1.5, backend="cpp"),
], ids=["pm_dice", "dice_ce", "focal", "dbce"])
def test_torch_export_model_and_loss(make):
    """torch.export of a model with a loss module traces the fused op (MONAI's Dice losses do not export)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1))
    loss_fn = make()

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.loss = model, loss_fn

        def forward(self, images, labels):
            return self.loss(self.model(images), labels)

    images, labels = torch.randn(2, 2, 8, 8), torch.randint(0, 4, (2, 1, 8, 8))
    exported = torch.export.export(Step(), (images, labels))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any(op.startswith("torch_medloss.") for op in ops), ops
    torch.testing.assert_close(exported.module()(images, labels), Step()(images, labels))


@given(
    spatial=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    classes=st.integers(1, 20),
    batch_size=st.integers(1, 3),
    activation=st.sampled_from(["softmax", "sigmoid", None]),
    squared=st.booleans(),
    batch=st.booleans(),
    background=st.booleans(),
    gamma=st.sampled_from([0.0, 1.0, 2.0, 2.5]),
    seed=st.integers(0, 1000),
)
def test_fuzz_cpp_matches_reference(spatial, classes, batch_size, activation, squared, batch, background, gamma,
                                    seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, classes, *spatial, dtype=torch.float64, generator=generator,
                         requires_grad=True)
    labels = torch.randint(0, classes, (batch_size, 1, *spatial), generator=generator)
    if classes == 1:
        labels = labels.double()
    options = dict(gamma=gamma, to_onehot_y=True, squared_pred=squared, batch=batch, include_background=background,
                   reduction="none", softmax=activation == "softmax", sigmoid=activation == "sigmoid")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [F.pm_dice_loss(logits, labels, backend=b, **options) for b in ("cpp", "reference")]
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-11)
    grads = [torch.autograd.grad(r.sum(), logits)[0] for r in results]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_triton_losses_under_the_interpreter():
    """DiceLoss, PMDiceLoss and DiceCELoss with backend="triton" equal the reference (TRITON_INTERPRET=1)."""
    script = textwrap.dedent("""
        import torch, torch_medloss
        torch.manual_seed(0)
        logits = torch.randn(2, 3, 5, 4, requires_grad=True)
        labels = torch.randint(0, 3, (2, 1, 5, 4))
        for cls, kw in [(torch_medloss.DiceLoss, dict(softmax=True, batch=True)),
                        (torch_medloss.PMDiceLoss, dict(softmax=True, gamma=[0.0, 1.0, 2.0])),
                        (torch_medloss.DiceCELoss, dict(sigmoid=True, label_smoothing=0.1)),
                        (torch_medloss.TverskyLoss, dict(softmax=True, ignore_index=2))]:
            values = [cls(to_onehot_y=True, backend=b, **kw)(logits, labels) for b in ("triton", "reference")]
            grads = [torch.autograd.grad(v, logits)[0] for v in values]
            torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_auto_uses_the_fused_kernel_on_cpu(monkeypatch):
    calls = []
    from torch_medloss.ops import dice_sums

    original = dice_sums.dice_loss
    monkeypatch.setattr(dice_sums, "dice_loss", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    torch_medloss.DiceLoss(to_onehot_y=True, softmax=True)(torch.randn(1, 2, 4, 4), torch.randint(0, 2, (1, 1, 4, 4)))
    assert calls == ["cpp"]


def test_double_backward_is_refused_clearly():
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (1, 1, 4, 4))
    loss = F.dice_loss(logits, labels, to_onehot_y=True, softmax=True, backend="cpp")
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()
