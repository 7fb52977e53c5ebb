"""Property tests over generated shapes: 1 to 3 spatial dims, odd and size-1 sizes, 1 to 20 classes."""

import warnings

import monai.losses
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_medloss
from torch_medloss import functional as F


@st.composite
def segmentation_case(draw, max_classes=20):
    spatial = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    batch = draw(st.integers(1, 3))
    classes = draw(st.integers(1, max_classes))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *spatial, dtype=torch.float64, generator=generator) * 3
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
    return logits, labels


@given(case=segmentation_case(), squared=st.booleans(), batch=st.booleans(), background=st.booleans())
def test_dice_matches_monai_and_pm_dice_gamma_zero(case, squared, batch, background):
    logits, labels = case
    if logits.shape[1] == 1:
        labels = labels.double()  # a single channel is a binary mask, not one-hot encoded (MONAI needs floats here)
    kwargs = dict(to_onehot_y=True, softmax=logits.shape[1] > 1, sigmoid=logits.shape[1] == 1,
                  squared_pred=squared, batch=batch, include_background=background, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class cases warn in both libraries
        ours = torch_medloss.DiceLoss(**kwargs)(logits, labels)
        theirs = monai.losses.DiceLoss(**kwargs)(logits, labels)
        pm = torch_medloss.PMDiceLoss(gamma=0.0, **kwargs)(logits, labels)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pm, ours, rtol=1e-12, atol=1e-12)
    assert ((ours >= 0) & (ours <= 1)).all()


@given(case=segmentation_case(max_classes=8), radius=st.sampled_from([0.0, 1.0, 1.5, 2.5]),
       element=st.sampled_from(["ball", "cube"]), batch=st.booleans())
def test_dbce_weight_invariants(case, radius, element, batch):
    logits, labels = case
    labels = labels[:, 0]
    num_classes = logits.shape[1]
    weights, class_weights, areas = F.dilated_class_weights(labels, num_classes, radius, element, batch=batch)
    own = class_weights.gather(-1, labels.flatten(1)).view_as(labels) if not batch else class_weights[labels]
    # Every pixel is in the dilation of its own class, so its weight is at least its own class weight.
    assert (weights >= own - 1e-6).all()
    counts = torch.nn.functional.one_hot(labels, num_classes).flatten(1, -2).sum(1)
    if batch:
        counts = counts.sum(0)
    assert (areas >= counts).all()  # dilation only grows a class
    loss = F.dbce_loss(logits, labels, radius=radius, element=element, batch=batch)
    assert torch.isfinite(loss) and loss >= 0
    if radius == 0:
        torch.testing.assert_close(loss, F.balanced_ce_loss(logits, labels, batch=batch))
