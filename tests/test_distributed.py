"""Distributed batch Dice: 2 gloo processes on CPU give the single-process loss and gradients of the whole batch."""

import subprocess
import sys
from pathlib import Path

import backends
import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


# float64 (tight comparisons of the gradients DDP averages): the reference and the C++ kernels.
@pytest.mark.parametrize("backend", backends.params("reference", "cpp"))
@pytest.mark.parametrize("loss", ["dice", "pm_dice", "generalized_dice", "tversky", "dice_ce", "dice_focal", "dbce",
                                  "balanced_ce"])
def test_two_ranks_match_one_process(loss, backend, tmp_path):
    backends.require(backend)
    result = subprocess.run([sys.executable, str(WORKER), loss, backend, str(tmp_path)], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(tmp_path / "single.pt")
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(ranked["loss"], single["loss"], rtol=1e-10, atol=1e-12)
        for got, expected in zip(ranked["grads"], single["grads"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_distributed_off_keeps_local_sums(tmp_path):
    """Without an initialized group nothing is reduced, and "off" is accepted."""
    import torch_medloss

    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 4))
    on = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, batch=True)(logits, labels)
    off = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, batch=True, distributed="off")(logits, labels)
    torch.testing.assert_close(on, off)
    with pytest.raises(ValueError, match="distributed must be one of"):
        torch_medloss.DiceLoss(distributed="always")
