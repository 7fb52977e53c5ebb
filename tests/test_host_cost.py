"""Host cost of a fused loss call on the GPU code path: kernel launches and other PyTorch ops, counted (issue 12).

Counted with torch_medloss.bench.host_cost (a TorchDispatchMode and a hook on Triton's launcher) on CPU tensors
through the Triton interpreter, which runs the same Python path as a CUDA call. The CPU-only label check is switched
off as it is on CUDA with validate=False. A count is deterministic: these are not timed tests.

Limits (issue 12, point 1): forward and backward together, at most 3 launches for the Dice family (focal included)
and 4 for DBCE and balanced CE, plus at most 2 other ops that launch work (autograd's ones_like is one of them).
"""

import backends
import pytest
import torch

import torch_medloss
from torch_medloss import _validation
from torch_medloss.bench.host_cost import loss_host_cost
from torch_medloss.reference import _common

pytestmark = pytest.mark.parametrize("backend", backends.params("triton"))

DICE_FAMILY = {
    "Dice": lambda b: torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, backend=b),
    "PMDice": lambda b: torch_medloss.PMDiceLoss(to_onehot_y=True, softmax=True, backend=b),
    "PMDice batch, per-class gamma": lambda b: torch_medloss.PMDiceLoss(
        gamma=[0.0, 1.0, 2.0, 3.0], to_onehot_y=True, softmax=True, batch=True, backend=b),
    "GeneralizedDice": lambda b: torch_medloss.GeneralizedDiceLoss(to_onehot_y=True, softmax=True, backend=b),
    "Tversky": lambda b: torch_medloss.TverskyLoss(to_onehot_y=True, softmax=True, backend=b),
    "DiceCE": lambda b: torch_medloss.DiceCELoss(to_onehot_y=True, softmax=True, backend=b),
    "DiceCE weighted": lambda b: torch_medloss.DiceCELoss(
        to_onehot_y=True, softmax=True, include_background=False, weight=[1.0, 2.0, 3.0, 4.0], backend=b),
    "Focal": lambda b: torch_medloss.FocalLoss(to_onehot_y=True, backend=b),
    "DiceFocal": lambda b: torch_medloss.DiceFocalLoss(to_onehot_y=True, softmax=True, backend=b),
    "GeneralizedDiceFocal": lambda b: torch_medloss.GeneralizedDiceFocalLoss(to_onehot_y=True, softmax=True,
                                                                             backend=b),
}
DBCE_FAMILY = {
    "DBCE 3-D": lambda b: torch_medloss.DBCELoss(radius=2.0, backend=b),
    "DBCE 3-D cube, batch": lambda b: torch_medloss.DBCELoss(radius=1.5, element="cube", batch=True, backend=b),
    "BalancedCE": lambda b: torch_medloss.BalancedCELoss(backend=b),
}


@pytest.fixture(autouse=True)
def no_label_check(monkeypatch):
    """What a CUDA call with validate=False skips: the label check that reads values (a device sync there)."""
    skip = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(_validation, "check_label_map", skip)
    monkeypatch.setattr(_common, "check_label_map", skip)


def _inputs(device):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, 6, generator=generator).to(device)
    labels = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=generator).to(device)
    return logits, labels


@pytest.mark.parametrize("name", DICE_FAMILY)
def test_dice_family_three_launches(name, backend):
    cost = loss_host_cost(DICE_FAMILY[name](backend), *_inputs(backends.device(backend)))
    assert cost.num_launches <= 3 and cost.num_ops <= 2, f"{name}: {dict(cost.launches)} {dict(cost.ops)}"


@pytest.mark.parametrize("name", DBCE_FAMILY)
def test_dbce_family_four_launches(name, backend):
    cost = loss_host_cost(DBCE_FAMILY[name](backend), *_inputs(backends.device(backend)))
    assert cost.num_launches <= 4 and cost.num_ops <= 2, f"{name}: {dict(cost.launches)} {dict(cost.ops)}"


def test_counts_are_what_the_kernels_launch(backend):
    """The counter sees what it should: Dice's three kernels by name, and autograd's ones_like."""
    cost = loss_host_cost(DICE_FAMILY["Dice"](backend), *_inputs(backends.device(backend)))
    assert dict(cost.launches) == {"_dice_partials_kernel": 1, "_dice_finalize_kernel": 1, "_dice_bwd_kernel": 1}
    assert dict(cost.ops) == {"aten::ones_like": 1}
