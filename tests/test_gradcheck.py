"""float64 gradcheck of every reference loss on tiny shapes, contiguous and permuted, over several seeds."""

import pytest
import torch

from torch_medloss import functional as F

LOSSES = {
    "dice": lambda x, y: F.dice_loss(x, y, to_onehot_y=True, softmax=True, backend="reference"),
    "dice_squared_jaccard_batch": lambda x, y: F.dice_loss(x, y, to_onehot_y=True, softmax=True, squared_pred=True,
                                                           jaccard=True, batch=True, backend="reference"),
    # PM Dice only with gamma = 0: for gamma > 0 the modulator is a stop-gradient weight, so the analytic gradient
    # differs from finite differences on purpose (test_pm_dice.py checks it against the explicit formula).
    "pm_dice": lambda x, y: F.pm_dice_loss(x, y, gamma=0.0, to_onehot_y=True, softmax=True, backend="reference"),
    "pm_dice_none": lambda x, y: F.pm_dice_loss(x, y, gamma=0.0, to_onehot_y=True, sigmoid=True,
                                                squared_pred=False, reduction="none", backend="reference"),
    "generalized_dice": lambda x, y: F.generalized_dice_loss(x, y, to_onehot_y=True, softmax=True,
                                                             backend="reference"),
    "tversky": lambda x, y: F.tversky_loss(x, y, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7,
                                           backend="reference"),
    "focal": lambda x, y: F.focal_loss(x, y, to_onehot_y=True, use_softmax=True, gamma=2.0, backend="reference"),
    "focal_sigmoid": lambda x, y: F.focal_loss(x, y, to_onehot_y=True, gamma=1.5, alpha=0.25, backend="reference"),
    "dice_ce": lambda x, y: F.dice_ce_loss(x, y, to_onehot_y=True, softmax=True, label_smoothing=0.1,
                                           backend="reference"),
    "dbce": lambda x, y: F.dbce_loss(x, y, radius=1.5, backend="reference"),
    "dbce_batch_none": lambda x, y: F.dbce_loss(x, y, radius=1.0, batch=True, reduction="none",
                                                backend="reference"),
    "balanced_ce": lambda x, y: F.balanced_ce_loss(x, y, backend="reference"),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize("name", LOSSES)
def test_reference_gradcheck(name, permuted, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (2, 1, 4, 3), generator=generator)
    if permuted:
        # Same values in a non-contiguous layout (spatial dims swapped in memory).
        logits = logits.transpose(2, 3).contiguous().transpose(2, 3)
        assert not logits.is_contiguous()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, labels), (logits,), eps=1e-6, atol=1e-7)


def test_gradcheck_3d_soft_label_dice():
    logits = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(1, 2, 3, 2, 2, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(
        lambda x: F.dice_loss(x, target, softmax=True, soft_label=True, backend="reference"), (logits,)
    )
