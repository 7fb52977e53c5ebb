"""Distributed batch Dice: 2 gloo processes on CPU give the single-process loss and gradients of the whole batch.

Every case runs in one launch of the two ranks (tests/ddp_worker.py), made by a module fixture the first time a
case needs it; each test then compares its own case's files.
"""

import os
import subprocess
import sys
from pathlib import Path

import backends
import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
LOSSES = ["dice", "pm_dice", "generalized_dice", "tversky", "dice_ce", "dice_focal", "dbce", "balanced_ce"]
BACKENDS = ("reference", "cpp")  # float64 (tight comparisons of the gradients DDP averages)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The output folder of one worker run over every loss on every backend that can run here."""
    usable = ["reference"]
    try:
        backends.require("cpp")
        usable.append("cpp")
    except pytest.skip.Exception:  # TORCH_MEDLOSS_NO_BUILD=1 and no build: its cases skip below
        pass
    out = tmp_path_factory.mktemp("ddp")
    cases = [f"{loss}:{backend}" for backend in usable for loss in LOSSES]
    result = subprocess.run([sys.executable, str(WORKER), str(out), *cases], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, usable


@pytest.mark.parametrize("backend", backends.params(*BACKENDS))
@pytest.mark.parametrize("loss", LOSSES)
def test_two_ranks_match_one_process(loss, backend, two_ranks):
    out, usable = two_ranks
    if backend not in usable:
        backends.require(backend)  # skips with the reason
    single = torch.load(out / f"{loss}-{backend}-single.pt")
    for rank in range(2):
        ranked = torch.load(out / f"{loss}-{backend}-rank{rank}.pt")
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
