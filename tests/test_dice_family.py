"""The fused Dice-family path (dice_sums + head) against the reference losses, over the options.

``SUMS_BACKENDS`` lists the sums implementations to run the head on: "reference" (the PyTorch contract, always),
"cpp" when the extension is built. Triton runs under the interpreter in test_dice_sums_triton.py; CUDA on a GPU.
"""

import itertools
import warnings

import pytest
import torch

from helpers import assert_same_loss
from torch_medloss import _extension, dice_family
from torch_medloss.reference import dice as dice_reference
from torch_medloss.reference.dice_ce import dice_ce_loss as dice_ce_reference

SUMS_BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    _extension.why_not_loaded(cuda=False) is not None or not hasattr(torch.ops.torch_medloss, "dice_sums_fwd"),
    reason="the C++ dice_sums op is not built"))]


def case(shape=(2, 4, 5, 6), dtype=torch.float64, kind="labels", ignore=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, dtype=dtype, generator=generator) * 2
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator)
    if ignore is not None:
        labels[0, 0, 0] = ignore
    if kind == "labels":
        return logits, labels
    onehot = torch.nn.functional.one_hot(labels[:, 0].clamp(0, shape[1] - 1), shape[1]).movedim(-1, 1).to(dtype)
    if kind == "onehot":
        if ignore is not None and not 0 <= ignore < shape[1]:
            onehot[0, :, 0] = 0  # a sentinel-ignored pixel: all-zero one-hot vector
        return logits, onehot
    return logits, torch.softmax(torch.randn(shape, dtype=dtype, generator=generator), 1)  # soft target


def check(fused, reference, logits, target, options, rtol=1e-9, atol=1e-10):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_loss(lambda x, y: fused(x, y, **options), lambda x, y: reference(x, y, **options),
                         logits, target, rtol, atol)


DICE_GRID = list(itertools.product(
    [{"softmax": True}, {"sigmoid": True}, {}],
    [False, True],  # squared_pred
    [False, True],  # batch
    [True, False],  # include_background
    ["mean", "none"],
))


@pytest.mark.parametrize("sums_backend", SUMS_BACKENDS)
@pytest.mark.parametrize("activation, squared, batch, background, reduction", DICE_GRID, ids=str)
def test_dice_and_pm_dice(sums_backend, activation, squared, batch, background, reduction):
    logits, labels = case()
    options = dict(to_onehot_y=True, squared_pred=squared, batch=batch, include_background=background,
                   reduction=reduction, **activation)
    check(lambda x, y, **o: dice_family.dice_loss(x, y, backend=sums_backend, **o), dice_reference.dice_loss,
          logits, labels, options)
    gamma = torch.tensor([0.0, 1.0, 2.0, 0.5][-3:] if not background else [0.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    check(lambda x, y, **o: dice_family.pm_dice_loss(x, y, backend=sums_backend, gamma=gamma, **o),
          lambda x, y, **o: dice_reference.pm_dice_loss(x, y, gamma=gamma, **o), logits, labels, options)


@pytest.mark.parametrize("sums_backend", SUMS_BACKENDS)
@pytest.mark.parametrize(
    "kind, options",
    [
        ("labels", {"to_onehot_y": True, "softmax": True, "ignore_index": 2}),
        ("labels", {"to_onehot_y": True, "softmax": True, "ignore_index": -100, "batch": True}),
        ("labels", {"to_onehot_y": True, "softmax": True, "jaccard": True, "weight": torch.tensor([1., 2, 3, 4])}),
        ("labels", {"to_onehot_y": True, "sigmoid": True, "weight": torch.tensor(2.0), "reduction": "sum"}),
        ("onehot", {"softmax": True}),
        ("onehot", {"softmax": True, "ignore_index": 1}),
        ("onehot", {"softmax": True, "ignore_index": -100, "include_background": False}),
        ("soft", {"softmax": True, "soft_label": True}),
        ("soft", {"softmax": True, "soft_label": True, "ignore_index": 3}),
        ("soft", {"sigmoid": True, "soft_label": False, "squared_pred": True}),
    ],
    ids=str,
)
def test_dice_target_kinds_and_masks(sums_backend, kind, options):
    ignore = options.get("ignore_index")
    logits, target = case(kind=kind, ignore=ignore)
    check(lambda x, y, **o: dice_family.dice_loss(x, y, backend=sums_backend, **o), dice_reference.dice_loss,
          logits, target, options)


@pytest.mark.parametrize("sums_backend", SUMS_BACKENDS)
@pytest.mark.parametrize("w_type, batch, soft", itertools.product(["square", "simple", "uniform"], [False, True],
                                                                  [False, True]))
def test_generalized_dice(sums_backend, w_type, batch, soft):
    logits, labels = case(shape=(2, 4, 6, 5))
    labels[labels == 3] = 0  # an absent class: MONAI's infinite-weight rule
    options = dict(to_onehot_y=True, softmax=True, w_type=w_type, batch=batch, soft_label=soft)
    check(lambda x, y, **o: dice_family.generalized_dice_loss(x, y, backend=sums_backend, **o),
          dice_reference.generalized_dice_loss, logits, labels, options)


@pytest.mark.parametrize("sums_backend", SUMS_BACKENDS)
@pytest.mark.parametrize("options", [
    {"to_onehot_y": True, "softmax": True, "alpha": 0.3, "beta": 0.7},
    {"to_onehot_y": True, "softmax": True, "batch": True, "reduction": "none", "include_background": False},
    {"to_onehot_y": True, "sigmoid": True, "ignore_index": 1, "soft_label": True},
], ids=str)
def test_tversky(sums_backend, options):
    logits, labels = case(shape=(2, 3, 4, 3, 5))
    check(lambda x, y, **o: dice_family.tversky_loss(x, y, backend=sums_backend, **o), dice_reference.tversky_loss,
          logits, labels, options)


@pytest.mark.parametrize("sums_backend", SUMS_BACKENDS)
@pytest.mark.parametrize("kind, options", [
    ("labels", {"to_onehot_y": True, "softmax": True}),
    ("labels", {"to_onehot_y": True, "softmax": True, "reduction": "sum", "batch": True, "lambda_ce": 0.5}),
    ("labels", {"to_onehot_y": True, "sigmoid": True, "weight": torch.tensor([0.5, 1.0, 2.0, 1.5]),
                "label_smoothing": 0.1, "include_background": False}),
    ("onehot", {"softmax": True, "weight": torch.tensor([0.5, 1.0, 2.0, 1.5]), "label_smoothing": 0.2}),
    ("soft", {"softmax": True, "squared_pred": True, "jaccard": True}),
], ids=str)
def test_dice_ce(sums_backend, kind, options):
    logits, target = case(kind=kind)
    options = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    check(lambda x, y, **o: dice_family.dice_ce_loss(x, y, backend=sums_backend, **o), dice_ce_reference,
          logits, target, options)


def test_blockers():
    logits, labels = case()
    assert dice_family.fusion_blocker(logits, labels, {"other_act": torch.tanh}) is not None
    assert dice_family.fusion_blocker(logits[:, :1], labels, {}, with_ce=True) is not None
    assert dice_family.fusion_blocker(torch.randn(1, 200, 4), labels, {}) is not None
    assert dice_family.fusion_blocker(logits, labels, {"to_onehot_y": True, "ignore_index": 3}) is None
    assert dice_family.fusion_blocker(logits[:, :1], labels.double(), {"ignore_index": 1}) is not None
