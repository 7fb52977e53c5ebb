"""Bad input raises TypeError/ValueError naming the argument; NaN logits propagate; unchecked bad labels give NaN."""

import backends
import pytest
import torch

import torch_medloss
from torch_medloss import functional as F

LOGITS = torch.linspace(-3, 3, 96).view(2, 3, 4, 4)
LABELS = torch.arange(32).remainder(3).view(2, 1, 4, 4)  # every class present, so +1 and -1 go out of range


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch_medloss.DiceLoss(softmax=True, sigmoid=True), ValueError, "more than one activation"),
        (lambda: torch_medloss.PMDiceLoss(sigmoid=True, other_act=torch.tanh), ValueError, "more than one"),
        (lambda: torch_medloss.DiceLoss(other_act=3), TypeError, "other_act must be None or callable"),
        (lambda: torch_medloss.DiceLoss(reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: torch_medloss.DiceLoss(reduction=3), TypeError, "reduction must be a str"),
        (lambda: torch_medloss.DiceLoss(weight=[1.0, -1.0]), ValueError, "weight must be finite and >= 0"),
        (lambda: torch_medloss.DiceLoss(weight="heavy"), TypeError, "weight must be a number or a sequence"),
        (lambda: torch_medloss.DiceLoss(batch="yes"), TypeError, "batch must be a bool"),
        (lambda: torch_medloss.DiceLoss(ignore_index=1.5), TypeError, "ignore_index must be an int or None"),
        (lambda: torch_medloss.DiceLoss(backend="fast"), ValueError, "backend must be one of"),
        (lambda: torch_medloss.DiceLoss(backend=None), TypeError, "backend must be a str"),
        (lambda: torch_medloss.PMDiceLoss(gamma=-1.0), ValueError, "gamma must be finite and >= 0"),
        (lambda: torch_medloss.PMDiceLoss(gamma=[1.0, -0.5]), ValueError, "gamma must be finite and >= 0"),
        (lambda: torch_medloss.GeneralizedDiceLoss(w_type="cubic"), ValueError, "w_type must be one of"),
        (lambda: torch_medloss.DiceCELoss(reduction="none"), ValueError,
         r"reduction must be one of \('mean', 'sum'\)"),
        (lambda: torch_medloss.DiceCELoss(lambda_ce=-1.0), ValueError, "lambda_ce must be a finite number >= 0"),
        (lambda: torch_medloss.DiceCELoss(label_smoothing=1.5), ValueError,
         r"label_smoothing must be a finite number >= 0 and <= 1"),
        (lambda: torch_medloss.FocalLoss(gamma=-2.0), ValueError, "gamma must be a finite number >= 0"),
        (lambda: torch_medloss.FocalLoss(alpha=1.5), ValueError, "alpha must be finite and >= 0 and <= 1"),
        (lambda: torch_medloss.DBCELoss(radius=-1.0), ValueError, "radius must be a finite number >= 0"),
        (lambda: torch_medloss.DBCELoss(spacing=(1.0, -1.0)), ValueError, "spacing must be a finite number > 0"),
        (lambda: torch_medloss.DBCELoss(spacing=(1.0, 0.0)), ValueError, "spacing must be a finite number > 0"),
        # no NaN, infinite or negative smoothing, Tversky weights or lambdas (issue 13 item 10)
        (lambda: torch_medloss.DiceLoss(smooth_nr=float("nan")), ValueError,
         "smooth_nr must be a finite number >= 0"),
        (lambda: torch_medloss.DiceLoss(smooth_dr=-1e-5), ValueError, "smooth_dr must be a finite number >= 0"),
        (lambda: torch_medloss.DiceLoss(smooth_dr=float("inf")), ValueError, "smooth_dr must be a finite number"),
        (lambda: torch_medloss.TverskyLoss(alpha=float("nan")), ValueError, "alpha must be a finite number >= 0"),
        (lambda: torch_medloss.TverskyLoss(beta=-0.5), ValueError, "beta must be a finite number >= 0"),
        (lambda: torch_medloss.DiceFocalLoss(lambda_focal=-1.0), ValueError, "lambda_focal must be a finite number"),
        # MONAI raises ValueError for reduction=None (issue 13 item 16)
        (lambda: torch_medloss.DiceLoss(reduction=None), ValueError, "reduction must be one of"),
        (lambda: torch_medloss.FocalLoss(reduction=None), ValueError, "reduction must be one of"),
        (lambda: torch_medloss.DBCELoss(spacing="1,1"), TypeError, "spacing must be None or a sequence"),
        (lambda: torch_medloss.DBCELoss(element="diamond"), ValueError, "element must be 'ball' or 'cube'"),
        (lambda: torch_medloss.DBCELoss(ignore_index=None), TypeError, "ignore_index must be an int"),
        (lambda: torch_medloss.BalancedCELoss(reduction="max"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "call, error, match",
    [
        # labels out of range
        (lambda: F.dice_loss(LOGITS, LABELS + 1, to_onehot_y=True), ValueError,
         r"target holds labels outside \[0, 3\)"),
        (lambda: F.dice_loss(LOGITS, LABELS - 1, to_onehot_y=True, ignore_index=-2), ValueError,
         r"outside \[0, 3\) or ignore_index=-2: \[-1\]"),
        (lambda: F.dbce_loss(LOGITS, LABELS + 3), ValueError, r"target holds labels outside \[0, 3\)"),
        (lambda: F.balanced_ce_loss(LOGITS, LABELS - 1, ignore_index=-100), ValueError, r"\[-1\]"),
        (lambda: F.dice_ce_loss(LOGITS, LABELS * 5, to_onehot_y=True), ValueError, "outside"),
        # float labels where labels are expected
        (lambda: F.dbce_loss(LOGITS, LABELS.float()), TypeError, "target must be an integer tensor"),
        (lambda: F.dice_loss(LOGITS, LABELS.float() + 0.5, to_onehot_y=True), ValueError, "not whole numbers"),
        (lambda: F.dice_loss(LOGITS, LABELS.bool(), to_onehot_y=True), TypeError, "integer class labels"),
        # non-floating logits
        (lambda: F.dice_loss(LABELS.repeat(1, 3, 1, 1), LABELS, to_onehot_y=True), TypeError,
         "input must be a floating-point tensor"),
        (lambda: F.dbce_loss(LABELS.repeat(1, 3, 1, 1), LABELS), TypeError, "input must be a floating-point tensor"),
        (lambda: F.dice_loss(LOGITS[0, 0, 0], LABELS), ValueError,
         r"input must have shape \(B, C\) or \(B, C, \*spatial\)"),
        (lambda: F.dbce_loss(LOGITS[:, :, 0, 0], LABELS[:, 0, 0]), ValueError,
         r"input must have shape \(B, C, \*spatial\) with at least one spatial dim"),
        # batch or spatial shape mismatch
        (lambda: F.dice_loss(LOGITS, LABELS[:1], to_onehot_y=True), ValueError, "target must match input's batch"),
        (lambda: F.tversky_loss(LOGITS, LABELS[..., :3], to_onehot_y=True), ValueError, "target must match"),
        (lambda: F.dbce_loss(LOGITS, LABELS[..., :3]), ValueError, r"target must be labels of shape \(B, \*S\)"),
        (lambda: F.focal_loss(LOGITS, LABELS[:1], to_onehot_y=True), ValueError, "target must match"),
        # wrong number of classes in a one-hot target
        (lambda: F.dice_loss(LOGITS, torch.zeros(2, 2, 4, 4)), ValueError, "target must be one-hot with 3 classes"),
        (lambda: F.dice_loss(LOGITS, LABELS), ValueError, "to_onehot_y=True"),
        (lambda: F.dice_loss(LOGITS, torch.zeros(2, 3, 4, 4), to_onehot_y=True), ValueError,
         "label map with 1 channel"),
        # per-class values of the wrong length
        (lambda: F.dice_loss(LOGITS, LABELS, to_onehot_y=True, weight=[1.0, 2.0]), ValueError,
         "weight has 2 values but there are 3 classes"),
        (lambda: F.pm_dice_loss(LOGITS, LABELS, to_onehot_y=True, gamma=[1.0, 2.0]), ValueError,
         "gamma has 2 values but there are 3 classes"),
        (lambda: F.dice_ce_loss(LOGITS, LABELS, to_onehot_y=True, weight=[1.0, 2.0]), ValueError,
         "weight has 2 values"),
        (lambda: F.dbce_loss(LOGITS, LABELS, spacing=(1.0, 1.0, 1.0)), ValueError,
         r"spacing must have one voxel size per spatial dim \(2\)"),
        # tensors on different devices
        (lambda: F.dice_loss(LOGITS, LABELS.to("meta"), to_onehot_y=True), ValueError, "same device"),
        (lambda: F.dbce_loss(LOGITS, LABELS.to("meta")), ValueError, "same device"),
        (lambda: F.dice_loss(LOGITS, [0, 1]), TypeError, "target must be a torch.Tensor"),
        # backends that this op does not have or that cannot run here
        (lambda: F.dice_focal_loss(LOGITS, LABELS, to_onehot_y=True, reduction="none", backend="cpp"),
         ValueError, "cannot run dice_focal_loss: reduction='none' of a Dice and focal sum"),
        (lambda: F.dice_loss(LOGITS, LABELS, to_onehot_y=True, backend="cuda"), ValueError,
         "cannot run dice_loss: the CUDA backend runs on CUDA tensors"),
        (lambda: F.dice_loss(LOGITS, LABELS, to_onehot_y=True, other_act=torch.tanh, backend="cpp"), ValueError,
         "cannot run dice_loss: other_act is an arbitrary callable"),
        (lambda: F.dilated_class_weights(LABELS[:, 0], 2, 1.0), ValueError, r"labels holds labels outside \[0, 2\)"),
        (lambda: F.dilated_class_weights(LABELS[:, 0].float(), 3, 1.0), TypeError, "labels must be an integer"),
        # as label_histogram: a ValueError for a bad value (issue 13 item 11)
        (lambda: F.dilated_class_weights(LABELS[:, 0], 0, 1.0), ValueError, "num_classes must be >= 1"),
        (lambda: F.dilated_class_weights(LABELS[:, 0], 2.5, 1.0), TypeError, "num_classes must be an int"),
    ],
)
def test_bad_tensors(call, error, match):
    with pytest.raises(error, match=match):
        call()


LOSSES = [
    lambda x, y: F.dice_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.pm_dice_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.generalized_dice_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.tversky_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.focal_loss(x, y, to_onehot_y=True),
    lambda x, y: F.dice_focal_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.generalized_dice_focal_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.dice_ce_loss(x, y, to_onehot_y=True, softmax=True),
    lambda x, y: F.dbce_loss(x, y),
    lambda x, y: F.balanced_ce_loss(x, y),
]


@pytest.mark.parametrize("loss", LOSSES)
def test_nan_logits_propagate(loss):
    logits = LOGITS.clone()
    logits[0, 1, 2, 2] = float("nan")
    assert torch.isnan(loss(logits, LABELS)).any()


@pytest.mark.parametrize("loss", LOSSES)
def test_unchecked_bad_labels_give_nan(loss, monkeypatch):
    """What a CUDA tensor without validate=True gets: a NaN loss, never an indexing error or a wrong number."""
    from torch_medloss import _validation
    from torch_medloss.reference import _common

    skip = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(_common, "check_label_map", skip)
    monkeypatch.setattr(_validation, "check_label_map", skip)
    bad = LABELS.clone()
    bad[1, 0, 0, 0] = 7
    assert torch.isnan(loss(LOGITS, bad)).all()


def test_validate_flag_is_accepted_and_checks():
    with pytest.raises(ValueError, match="outside"):
        torch_medloss.DiceLoss(to_onehot_y=True, validate=True)(LOGITS, LABELS + 5)


# --------------------------------------------------------------------------------------------- issue 13's findings


def test_target_that_requires_grad_gets_its_gradient():
    """A soft target that requires grad: the fused kernels give the logits' gradient only, so "auto" runs the
    reference (with one warning) and a named fused backend refuses; the target's gradient is never dropped."""
    backends.require("cpp")  # "auto" must have a fused backend to fall back from
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    target = torch.softmax(torch.randn(2, 3, 5, 5), 1).requires_grad_()
    expected = torch.autograd.grad(F.dice_loss(logits, target, softmax=True, backend="reference"), target)[0]
    loss = torch_medloss.DiceLoss(softmax=True)
    with pytest.warns(UserWarning, match="the target requires grad"):
        value = loss(logits, target)
    (grad,) = torch.autograd.grad(value, target)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match="backend='cpp' cannot run dice_loss: the target requires grad"):
        F.dice_loss(logits, target, softmax=True, backend="cpp")


@pytest.mark.parametrize("dtype, ignore_index, stored", [
    (torch.uint8, -1, 255), (torch.uint8, -100, 156), (torch.int8, 255, -1), (torch.int16, 40000, -25536),
], ids=str)
def test_ignore_index_the_label_dtype_cannot_hold_matches_no_label(dtype, ignore_index, stored):
    """Labels compare with ignore_index as integers, never through a wrapped copy (uint8's 255 is not -1): a label
    whose bits equal the wrapped ignore_index is an out-of-range label, on every backend, reference included."""
    labels = LABELS.clone().to(dtype)
    labels[0, 0, 0, 0] = stored
    for call in (lambda b: F.dice_loss(LOGITS, labels, to_onehot_y=True, ignore_index=ignore_index, backend=b),
                 lambda b: F.dbce_loss(LOGITS, labels, ignore_index=ignore_index, backend=b),
                 lambda b: F.dilated_class_weights(labels[:, 0], 3, 1.0, ignore_index=ignore_index, backend=b)):
        for backend in ("reference", "auto"):
            with pytest.raises(ValueError, match=f"outside \\[0, 3\\) or ignore_index={ignore_index}: \\[{stored}\\]"):
                call(backend)


def test_float64_on_the_triton_backend_is_refused_by_the_dispatcher():
    with pytest.raises(ValueError, match="backend='triton' cannot run dice_loss: float64 logits are fused by the C"):
        F.dice_loss(LOGITS.double(), LABELS, to_onehot_y=True, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run dbce_loss: float64 logits are fused by the C"):
        F.dbce_loss(LOGITS.double(), LABELS, backend="triton")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    """Batch size 0: the fused DBCE and balanced CE give what the reference gives (no reshape error)."""
    logits, labels = LOGITS[:0], LABELS[:0]
    for loss in (F.dbce_loss, F.balanced_ce_loss):
        expected = loss(logits, labels, reduction=reduction, backend="reference")
        for backend in ("auto", "triton"):
            value = loss(logits, labels, reduction=reduction, backend=backend)
            assert value.shape == expected.shape
            torch.testing.assert_close(value, expected.to(value.dtype))


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_masked_class_keeps_the_focal_loss_finite(use_softmax, gamma):
    """A -inf logit of a class that is not the target: the focal loss and its gradient stay finite on every backend
    (MONAI's 0 * -inf gives NaN there: a deliberate difference, as for the cross entropy of issue 13 item 2)."""
    logits = LOGITS.clone()
    logits[:, 2] = float("-inf")
    labels = LABELS.clone() % 2
    values = []
    for backend in ("reference", "auto", "triton"):
        leaf = logits.clone().requires_grad_()
        loss = F.focal_loss(leaf, labels, to_onehot_y=True, use_softmax=use_softmax, gamma=gamma, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all(), backend
        values.append((loss.detach(), leaf.grad))
    for value, grad in values[1:]:
        torch.testing.assert_close(value, values[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, values[0][1], rtol=1e-5, atol=1e-6)
