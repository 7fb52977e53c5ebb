"""PM Dice (arXiv 2506.15744): hand-computed values, gamma = 0 equals Dice, stop-gradient modulator, per-class gamma."""

import pytest
import torch

import torch_medloss
from torch_medloss import functional as F


def test_hand_computed_two_pixels():
    # Probabilities given directly (no activation); pixel 0 is class 0, pixel 1 is class 1; gamma = 1.
    p = torch.tensor([[[0.8, 0.3], [0.2, 0.7]]], dtype=torch.float64)
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    # class 0: m = [0.2, 0.3], I = 0.2*0.8 = 0.16, D = 0.2*(1 + 0.64) + 0.3*(0 + 0.09) = 0.355
    # class 1: m = [0.2, 0.3], I = 0.3*0.7 = 0.21, D = 0.2*(0 + 0.04) + 0.3*(1 + 0.49) = 0.455
    expected = torch.tensor([[1 - 0.32 / 0.355, 1 - 0.42 / 0.455]], dtype=torch.float64)
    loss = torch_medloss.PMDiceLoss(gamma=1.0, smooth_nr=0.0, smooth_dr=0.0, reduction="none")(p, y)
    torch.testing.assert_close(loss.view(1, 2), expected)
    # Not squared: D = sum m*(y + p): class 0: 0.2*1.8 + 0.3*0.3 = 0.45; class 1: 0.2*0.2 + 0.3*1.7 = 0.55
    expected = torch.tensor([[1 - 0.32 / 0.45, 1 - 0.42 / 0.55]], dtype=torch.float64)
    loss = torch_medloss.PMDiceLoss(gamma=1.0, squared_pred=False, smooth_nr=0.0, smooth_dr=0.0, reduction="none")
    torch.testing.assert_close(loss(p, y).view(1, 2), expected)


@pytest.mark.parametrize("squared_pred", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma_zero_equals_dice(squared_pred, batch, include_background, reduction):
    logits = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (3, 1, 6, 5))
    common = dict(to_onehot_y=True, softmax=True, squared_pred=squared_pred, batch=batch,
                  include_background=include_background, reduction=reduction, weight=[1.0, 2.0, 0.5, 1.5][-3:]
                  if not include_background else [1.0, 2.0, 0.5, 1.5])
    pm = torch_medloss.PMDiceLoss(gamma=0.0, **common)(logits, labels)
    dice = torch_medloss.DiceLoss(**common)(logits, labels)
    torch.testing.assert_close(pm, dice, rtol=1e-12, atol=1e-12)
    (g_pm,) = torch.autograd.grad(pm.sum(), logits)
    (g_dice,) = torch.autograd.grad(dice.sum(), logits)
    torch.testing.assert_close(g_pm, g_dice, rtol=1e-12, atol=1e-12)


def test_modulator_is_stop_gradient():
    """The gradient treats m = |y - p|^gamma as a constant weight."""
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 5, 5))
    loss = F.pm_dice_loss(logits, labels, gamma=2.0, to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=0.0)
    (grad,) = torch.autograd.grad(loss, logits)

    p = torch.softmax(logits, 1)
    y = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    m = (y - p).abs().pow(2).detach()
    intersection = (m * p * y).sum((2, 3))
    denominator = (m * (p * p + y * y)).sum((2, 3))
    manual = (1 - 2 * intersection / denominator).mean()
    (expected,) = torch.autograd.grad(manual, logits, retain_graph=True)
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(grad, expected)
    # And it differs from letting gradients flow through m, so the test above can fail.
    m_live = (y - p).abs().pow(2)
    live = (1 - 2 * (m_live * p * y).sum((2, 3)) / (m_live * (p * p + y * y)).sum((2, 3))).mean()
    (live_grad,) = torch.autograd.grad(live, logits)
    assert not torch.allclose(live_grad, grad)


def test_per_class_gamma():
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 5, 5))
    per_class = F.pm_dice_loss(logits, labels, gamma=[0.0, 1.0, 2.0], to_onehot_y=True, softmax=True,
                               reduction="none").view(2, 3)
    for c, gamma in enumerate([0.0, 1.0, 2.0]):
        single = F.pm_dice_loss(logits, labels, gamma=gamma, to_onehot_y=True, softmax=True, reduction="none")
        torch.testing.assert_close(per_class[:, c], single.view(2, 3)[:, c])
    # Without background the sequence has one gamma per kept class.
    kept = F.pm_dice_loss(logits, labels, gamma=[1.0, 2.0], to_onehot_y=True, softmax=True,
                          include_background=False, reduction="none").view(2, 2)
    torch.testing.assert_close(kept, per_class[:, 1:])


def test_gamma_changes_the_loss_and_weighs_hard_pixels():
    # One easy and one hard foreground pixel: a larger gamma puts more weight on the hard one.
    p = torch.tensor([[[0.05, 0.6], [0.95, 0.4]]], dtype=torch.float64)  # class 1 pixels: p = 0.95 (easy), 0.4
    y = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    values = [torch_medloss.PMDiceLoss(gamma=g, include_background=False)(p, y).item() for g in (0.0, 1.0, 2.0)]
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("soft_label", [False, True])
def test_gamma_zero_is_bitwise_dice_on_the_reference(squared_pred, batch, soft_label):
    """0^0 = 1: PM Dice with gamma 0 is DiceLoss bit for bit, the references included (issue 13 item 13: the
    channels-last one-hot of the reference once summed in another order)."""
    logits = torch.randn(2, 3, 7, 5)
    labels = torch.randint(0, 3, (2, 1, 7, 5))
    options = dict(squared_pred=squared_pred, batch=batch, soft_label=soft_label, to_onehot_y=True, softmax=True,
                   backend="reference")
    pm = torch_medloss.PMDiceLoss(gamma=0.0, **options)(logits, labels)
    assert torch.equal(pm, torch_medloss.DiceLoss(**options)(logits, labels))
