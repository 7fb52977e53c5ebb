"""The MONAI-named losses give MONAI 1.6.1's values, gradients and output shapes over a grid of options."""

import itertools
import warnings

import backends
import monai.losses
import pytest
import torch

import torch_medloss
from helpers import assert_same_loss


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """Every parity test runs on the reference and on what "auto" picks here (the fused C++ kernels on CPU)."""
    return request.param


SHAPES = {"2d": (2, 4, 7, 5), "3d": (2, 4, 5, 4, 3)}
DTYPES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-6, 1e-9)}


def make_case(shape, dtype, onehot):
    logits = torch.randn(shape, dtype=dtype) * 2
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]))
    if onehot:
        target = torch.nn.functional.one_hot(labels[:, 0], shape[1]).movedim(-1, 1).to(dtype)
        return logits, target
    return logits, labels


def check(ours_cls, monai_cls, kwargs, shape_key, dtype, backend, onehot=False):
    logits, target = make_case(SHAPES[shape_key], dtype, onehot)
    rtol, atol = DTYPES[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn alike for single-channel options
        assert_same_loss(ours_cls(backend=backend, **kwargs), monai_cls(**kwargs), logits, target, rtol, atol)


ACTIVATIONS = [{"softmax": True}, {"sigmoid": True}, {}, {"other_act": torch.tanh}]

DICE_GRID = [
    dict(**act, squared_pred=sq, jaccard=jac, batch=batch, include_background=bg, reduction=red)
    for act, sq, jac, batch, bg, red in itertools.product(
        ACTIVATIONS[:2], [False, True], [False, True], [False, True], [True, False], ["mean", "sum", "none"]
    )
    if not (jac and sq and red == "sum")  # keep the grid small: the rest covers jaccard x squared
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", DICE_GRID, ids=str)
def test_dice_loss_grid(kwargs, dtype, backend):
    check(torch_medloss.DiceLoss, monai.losses.DiceLoss, {"to_onehot_y": True, **kwargs}, "2d", dtype, backend)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"softmax": True, "weight": [0.5, 1.0, 2.0, 3.0]},
        {"softmax": True, "weight": 2.0, "batch": True},
        {"softmax": True, "weight": [1.0, 2.0, 3.0], "include_background": False, "reduction": "none"},
        {"softmax": True, "ignore_index": 2},
        {"softmax": True, "ignore_index": 1, "include_background": False, "batch": True},
        {"sigmoid": True, "ignore_index": -1},
        {"softmax": True, "soft_label": True},
        {"softmax": True, "soft_label": True, "squared_pred": True, "jaccard": True},
        {"other_act": torch.tanh, "soft_label": True},
        {"softmax": True, "smooth_nr": 0.0, "smooth_dr": 1e-3},
    ],
    ids=str,
)
@pytest.mark.parametrize("shape_key", SHAPES)
def test_dice_loss_options(kwargs, shape_key, backend):
    check(
        torch_medloss.DiceLoss,
        monai.losses.DiceLoss,
        {"to_onehot_y": True, **kwargs},
        shape_key,
        torch.float64,
        backend,
    )


@pytest.mark.parametrize("ignore_index", [None, 1, -100])
@pytest.mark.parametrize("soft_label", [False, True])
def test_dice_loss_one_hot_target(ignore_index, soft_label, backend):
    kwargs = {"softmax": True, "ignore_index": ignore_index, "soft_label": soft_label}
    check(torch_medloss.DiceLoss, monai.losses.DiceLoss, kwargs, "3d", torch.float64, backend, onehot=True)


def test_dice_loss_soft_target(backend):
    logits = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    target = torch.softmax(torch.randn(2, 3, 6, 5, dtype=torch.float64), 1)
    for soft_label in (False, True):
        kwargs = {"softmax": True, "soft_label": soft_label}
        assert_same_loss(
            torch_medloss.DiceLoss(backend=backend, **kwargs),
            monai.losses.DiceLoss(**kwargs),
            logits,
            target,
            1e-6,
            1e-9,
        )


def test_single_channel_warnings_match(backend):
    logits, target = torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 1, 4, 4)).float()
    kwargs = {"softmax": True, "to_onehot_y": True, "include_background": False}
    with pytest.warns(UserWarning, match="single channel prediction"):
        ours = torch_medloss.DiceLoss(backend=backend, **kwargs)(logits, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = monai.losses.DiceLoss(**kwargs)(logits, target)
    torch.testing.assert_close(ours, theirs)


GDL_GRID = [
    dict(**act, w_type=w, batch=batch, include_background=bg, reduction=red)
    for act, w, batch, bg, red in itertools.product(
        ACTIVATIONS[:2], ["square", "simple", "uniform"], [False, True], [True, False], ["mean", "none"]
    )
]


@pytest.mark.parametrize("kwargs", GDL_GRID, ids=str)
def test_generalized_dice_grid(kwargs, backend):
    check(
        torch_medloss.GeneralizedDiceLoss,
        monai.losses.GeneralizedDiceLoss,
        {"to_onehot_y": True, **kwargs},
        "2d",
        torch.float64,
        backend,
    )


def test_generalized_dice_absent_class_and_soft_label(backend):
    # Class 3 is absent: its infinite weight becomes the largest finite one, as in MONAI.
    logits = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    for kwargs in (
        {"softmax": True},
        {"softmax": True, "batch": True, "reduction": "sum"},
        {"softmax": True, "soft_label": True},
    ):
        kwargs = {"to_onehot_y": True, **kwargs}
        assert_same_loss(
            torch_medloss.GeneralizedDiceLoss(backend=backend, **kwargs),
            monai.losses.GeneralizedDiceLoss(**kwargs),
            logits,
            labels,
            1e-6,
            1e-9,
        )


TVERSKY_GRID = [
    dict(**act, alpha=a, beta=b, batch=batch, include_background=bg, reduction=red)
    for act, (a, b), batch, bg, red in itertools.product(
        ACTIVATIONS[:2], [(0.5, 0.5), (0.3, 0.7)], [False, True], [True, False], ["mean", "sum", "none"]
    )
] + [{"softmax": True, "ignore_index": 2}, {"sigmoid": True, "soft_label": True, "ignore_index": -100}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", TVERSKY_GRID, ids=str)
def test_tversky_grid(kwargs, dtype, backend):
    check(torch_medloss.TverskyLoss, monai.losses.TverskyLoss, {"to_onehot_y": True, **kwargs}, "3d", dtype, backend)


FOCAL_GRID = [
    dict(use_softmax=sm, gamma=g, alpha=alpha, include_background=bg, reduction=red)
    for sm, g, alpha, bg, red in itertools.product(
        [False, True], [0.0, 2.0], [None, 0.25], [True, False], ["mean", "sum", "none"]
    )
] + [
    {"use_softmax": True, "alpha": [0.1, 0.2, 0.3, 0.4]},
    {"alpha": [0.1, 0.2, 0.3, 0.4], "weight": [1.0, 2.0, 0.5, 1.0]},
    {"weight": 3.0, "reduction": "sum"},
    {"use_softmax": True, "ignore_index": 1, "reduction": "sum"},
    {"ignore_index": -100, "reduction": "mean"},
    {"ignore_index": 3, "reduction": "none", "include_background": False},
]


@pytest.mark.parametrize("kwargs", FOCAL_GRID, ids=str)
def test_focal_grid(kwargs, backend):
    # MONAI computes the focal loss in float32 whatever the input, so parity is checked in float32.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scalar alpha without background is ignored, with a warning, by both
        check(
            torch_medloss.FocalLoss,
            monai.losses.FocalLoss,
            {"to_onehot_y": True, **kwargs},
            "2d",
            torch.float32,
            backend,
        )


def test_focal_ignore_index_label_map(backend):
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 1, 5, 5))
    labels[0, 0, :2] = -100
    kwargs = {"to_onehot_y": True, "ignore_index": -100, "use_softmax": True}
    assert_same_loss(
        torch_medloss.FocalLoss(backend=backend, **kwargs), monai.losses.FocalLoss(**kwargs), logits, labels, 1e-5, 1e-6
    )


DICE_CE_GRID = [
    dict(
        softmax=True,
        squared_pred=sq,
        jaccard=jac,
        batch=batch,
        include_background=bg,
        reduction=red,
        lambda_dice=ld,
        lambda_ce=lc,
    )
    for sq, jac, batch, bg, red, (ld, lc) in itertools.product(
        [False, True], [False, True], [False, True], [True, False], ["mean", "sum"], [(1.0, 1.0), (0.3, 2.0)]
    )
    if not (sq and jac)
]


@pytest.mark.parametrize("kwargs", DICE_CE_GRID, ids=str)
def test_dice_ce_grid(kwargs, backend):
    check(
        torch_medloss.DiceCELoss, monai.losses.DiceCELoss, {"to_onehot_y": True, **kwargs}, "2d", torch.float64, backend
    )


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("onehot", [False, True])
def test_dice_ce_weight_smoothing_onehot(include_background, label_smoothing, onehot, backend):
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    kwargs = {
        "softmax": True,
        "to_onehot_y": not onehot,
        "weight": weight,
        "include_background": include_background,
        "label_smoothing": label_smoothing,
    }
    check(torch_medloss.DiceCELoss, monai.losses.DiceCELoss, kwargs, "2d", torch.float64, backend, onehot=onehot)


def test_dice_ce_single_channel_is_bce(backend):
    logits = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    target = torch.randint(0, 2, (2, 1, 6, 6)).to(torch.float64)
    kwargs = {"sigmoid": True, "weight": torch.tensor([2.0], dtype=torch.float64)}
    assert_same_loss(
        torch_medloss.DiceCELoss(backend=backend, **kwargs),
        monai.losses.DiceCELoss(**kwargs),
        logits,
        target,
        1e-6,
        1e-9,
    )


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32])
def test_label_dtypes(label_dtype, backend):
    """Labels of any integer dtype, and MONAI's float label maps, give the same loss."""
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    expected = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(
        torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, backend=backend)(logits, labels.to(label_dtype)),
        expected,
    )


def test_label_map_without_channel_dim(backend):
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    loss = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, backend=backend)
    torch.testing.assert_close(loss(logits, labels[:, 0]), loss(logits, labels))


def test_channels_last_input(backend):
    logits = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 6, 5))
    loss = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, backend=backend)
    torch.testing.assert_close(loss(logits.to(memory_format=torch.channels_last), labels), loss(logits, labels))


def test_module_moves_buffers_and_keeps_monai_names():
    loss = torch_medloss.DiceLoss(weight=[1.0, 2.0])
    assert "class_weight" in dict(loss.named_buffers())
    assert loss.to(torch.float64).class_weight.dtype == torch.float64
    assert loss.reduction == "mean" and loss.include_background is True


# ------------------------------------------------------------------------------ the focal family (issue 13, 18-19)

DICE_FOCAL_GRID = [
    dict(**act, squared_pred=sq, batch=batch, include_background=bg, reduction=red, gamma=gamma)
    for act, sq, batch, bg, red, gamma in itertools.product(
        ACTIVATIONS[:2], [False, True], [False, True], [True, False], ["mean", "sum"], [2.0, 0.5])
    if not (sq and gamma == 0.5)
] + [
    dict(softmax=True, weight=[0.5, 1.0, 2.0, 1.5], alpha=0.25, lambda_dice=0.3, lambda_focal=2.0),
    dict(sigmoid=True, jaccard=True, weight=2.0, reduction="none"),
]


@pytest.mark.parametrize("kwargs", DICE_FOCAL_GRID, ids=str)
def test_dice_focal_grid(kwargs, backend):
    # MONAI's focal part computes in float32 whatever the input: parity in float32.
    check(torch_medloss.DiceFocalLoss, monai.losses.DiceFocalLoss, {"to_onehot_y": True, **kwargs}, "2d",
          torch.float32, backend)


GENERALIZED_DICE_FOCAL_GRID = [
    dict(**act, batch=batch, include_background=bg, reduction=red, w_type=w_type)
    for act, batch, bg, red, w_type in itertools.product(
        ACTIVATIONS[:2], [False, True], [True, False], ["mean", "sum"], ["square", "simple"])
] + [dict(softmax=True, weight=[0.5, 1.0, 2.0, 1.5], gamma=1.0, lambda_gdl=0.5, lambda_focal=3.0)]


@pytest.mark.parametrize("kwargs", GENERALIZED_DICE_FOCAL_GRID, ids=str)
def test_generalized_dice_focal_grid(kwargs, backend):
    check(torch_medloss.GeneralizedDiceFocalLoss, monai.losses.GeneralizedDiceFocalLoss,
          {"to_onehot_y": True, **kwargs}, "3d", torch.float32, backend)


# ---------------------------------------------------------------------------- MONAI's (B, C) inputs (issue 13, 15)


def test_classification_focal_loss_equals_bce_with_gamma_zero(backend):
    """MONAI's own classification-style example: (B, C) logits, gamma 0, is BCE-with-logits."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.rand(128, 10, generator=generator)
    labels = torch.randint(0, 10, (128, 1), generator=generator)
    ours = torch_medloss.FocalLoss(to_onehot_y=True, gamma=0.0, backend=backend)(logits, labels)
    theirs = monai.losses.FocalLoss(to_onehot_y=True, gamma=0.0)(logits, labels)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 10).float()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot))


@pytest.mark.parametrize("ours_cls, monai_cls, kwargs", [
    (torch_medloss.DiceLoss, monai.losses.DiceLoss, {"softmax": True}),
    (torch_medloss.DiceLoss, monai.losses.DiceLoss, {"sigmoid": True, "reduction": "none", "batch": True}),
    (torch_medloss.TverskyLoss, monai.losses.TverskyLoss, {"softmax": True, "alpha": 0.3, "beta": 0.7}),
    (torch_medloss.DiceCELoss, monai.losses.DiceCELoss, {"softmax": True}),
    (torch_medloss.FocalLoss, monai.losses.FocalLoss, {"use_softmax": True, "reduction": "sum"}),
], ids=lambda value: getattr(value, "__name__", str(value)))
def test_inputs_without_spatial_dims(ours_cls, monai_cls, kwargs, backend):
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (6, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_loss(ours_cls(to_onehot_y=True, backend=backend, **kwargs), monai_cls(to_onehot_y=True, **kwargs),
                         logits, labels, 1e-6, 1e-9)


def test_float64_target_promotes_the_loss(backend):
    """float32 logits with a float64 one-hot target: MONAI's products promote to float64, so does ours (item 9)."""
    logits = torch.randn(2, 3, 5, 5)
    target = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 5, 5)), 3).movedim(-1, 1).double()
    for ours_cls, monai_cls in ((torch_medloss.DiceLoss, monai.losses.DiceLoss),
                                (torch_medloss.TverskyLoss, monai.losses.TverskyLoss)):
        ours = ours_cls(softmax=True, backend=backend)(logits, target)
        theirs = monai_cls(softmax=True)(logits, target)
        assert ours.dtype == theirs.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- the Triton kernels, through the interpreter


@pytest.mark.parametrize("ours_cls, monai_cls, kwargs", [
    (torch_medloss.DiceLoss, monai.losses.DiceLoss, {"softmax": True, "batch": True}),
    (torch_medloss.DiceLoss, monai.losses.DiceLoss, {"sigmoid": True, "reduction": "none", "squared_pred": True}),
    (torch_medloss.GeneralizedDiceLoss, monai.losses.GeneralizedDiceLoss, {"softmax": True, "w_type": "simple"}),
    (torch_medloss.TverskyLoss, monai.losses.TverskyLoss, {"softmax": True, "include_background": False}),
    (torch_medloss.DiceCELoss, monai.losses.DiceCELoss, {"softmax": True, "label_smoothing": 0.1}),
    (torch_medloss.FocalLoss, monai.losses.FocalLoss, {"use_softmax": True, "alpha": 0.25}),
    (torch_medloss.FocalLoss, monai.losses.FocalLoss, {"ignore_index": 2, "reduction": "none"}),
    (torch_medloss.DiceFocalLoss, monai.losses.DiceFocalLoss, {"softmax": True, "weight": [1.0, 2.0, 1.0, 0.5]}),
    (torch_medloss.GeneralizedDiceFocalLoss, monai.losses.GeneralizedDiceFocalLoss, {"sigmoid": True}),
], ids=lambda value: getattr(value, "__name__", str(value)))
@pytest.mark.parametrize("triton_backend", backends.params("triton"))
def test_triton_matches_monai(ours_cls, monai_cls, kwargs, triton_backend):
    logits, labels = make_case(SHAPES["3d"], torch.float32, onehot=False)
    device = backends.device("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ours_cls(to_onehot_y=True, backend="triton", **kwargs)
        assert_same_loss(lambda x, y: ours(x.to(device), y.to(device)).cpu(), monai_cls(to_onehot_y=True, **kwargs),
                         logits, labels, 1e-5, 1e-6)
