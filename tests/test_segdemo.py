"""Tests of the segmentation study (torch_medloss.segdemo) and its U-Net: labels, lesions, slabs, metrics on
hand-computed cases, the U-Net's shapes, and a tiny training run whose loss falls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from torch_medloss.models import UNet  # noqa: E402
from torch_medloss.segdemo import metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def brain():
    pytest.importorskip("nilearn")
    from torch_medloss.segdemo import data

    return data.load_brain(2)


# ---------------------------------------------------------------------------------------------------------------
# Labels, slabs, lesions


def test_class_proportions(brain):
    from torch_medloss.segdemo import data

    labels = brain.labels
    assert brain.image.shape == labels.shape and brain.image.dtype == np.float32
    assert set(np.unique(labels)) == {data.BACKGROUND, data.CSF, data.GM, data.WM}
    inside = labels > 0
    frac = {c: (labels == c).sum() / inside.sum() for c in (data.CSF, data.GM, data.WM)}
    # Plausible adult brain tissue fractions (of the brain mask): CSF small, GM the largest, WM about a third.
    assert 0.03 < frac[data.CSF] < 0.25, frac
    assert 0.4 < frac[data.GM] < 0.7, frac
    assert 0.2 < frac[data.WM] < 0.5, frac
    assert 0.3 < (labels == 0).mean() < 0.9
    # On a test slice every class is present, and WM is brighter than GM, brighter than CSF (T1 contrast).
    z = brain.test_slab[0]
    assert set(np.unique(labels[z])) == {0, 1, 2, 3}
    means = [brain.image[labels == c].mean() for c in (data.CSF, data.GM, data.WM)]
    assert means[0] < means[1] < means[2], means


def test_slabs_disjoint(brain):
    from torch_medloss.segdemo import data

    a, b = brain.test_slab
    assert b - a == data.TEST_SLICES
    train = set(brain.train_slices)
    assert train and not train & set(range(a - data.GAP, b + data.GAP))
    # 3D patches stay inside one training slab.
    rng = np.random.default_rng(0)
    x, y = data.training_batch(brain, rng, 3, 3, 16)
    assert x.shape == (3, 1, 16, 16, 16) and y.shape == x.shape and x.dtype == np.float32


def test_test_set_has_no_training_slice(brain):
    from torch_medloss.segdemo import data

    x, y = data.test_set(brain, 2, repeats=1)
    a, b = brain.test_slab
    assert len(x) == b - a
    ref = brain.labels[a:b]
    # Outside lesions, the test labels are the test slab's labels, slice by slice.
    keep = y[:, 0] != data.LESION
    assert np.array_equal(y[:, 0][keep], ref[keep])


def test_lesions_inside_white_matter_and_radius(brain):
    from torch_medloss.segdemo import data

    z = brain.test_slab[0]
    img, lab = brain.image[z], brain.labels[z]
    rng = np.random.default_rng(1)
    for _ in range(20):
        new_img, new_lab, lesions = data.insert_lesions(img, lab, rng, count=(1, 4))
        lesion = new_lab == data.LESION
        assert lesion.any() and 1 <= len(lesions) <= 4
        assert np.all(lab[lesion] == data.WM)              # every lesion voxel was white matter
        assert np.array_equal(new_lab[~lesion], lab[~lesion])  # nothing else changed
        for les in lesions:
            assert np.all((les["radii"] >= data.R_MIN) & (les["radii"] <= data.R_MAX))
        # Each lesion fits in the largest radius: no lesion voxel farther than R_MAX from some centre.
        pts = np.argwhere(lesion)
        centres = np.array([les["center"] for les in lesions])
        dist = np.linalg.norm(pts[:, None, :] - centres[None], axis=2).min(axis=1)
        assert dist.max() <= data.R_MAX + 1e-6
        assert not np.array_equal(new_img[lesion], img[lesion])  # altered intensity
    # 3D: also inside WM.
    vol_lab = brain.labels[brain.test_slab[0]:brain.test_slab[1]]
    _, vol_new, les3 = data.insert_lesions(brain.image[brain.test_slab[0]:brain.test_slab[1]], vol_lab, rng,
                                           count=(5, 5))
    assert len(les3) == 5 and np.all(vol_lab[vol_new == data.LESION] == data.WM)


def test_lesions_differ_between_samples(brain):
    from torch_medloss.segdemo import data

    rng = np.random.default_rng(0)
    _, y = data.training_batch(brain, rng, 4, 2, 64)
    masks = [(y[i, 0] == data.LESION) for i in range(4)]
    assert all(m.any() for m in masks)
    assert len({m.tobytes() for m in masks}) == 4
    _, yt = data.test_set(brain, 2, repeats=2)
    n = len(yt) // 2
    assert not np.array_equal(yt[:n] == data.LESION, yt[n:] == data.LESION)  # same slices, other lesions
    # Small-lesion imbalance: a few percent of the voxels at most.
    assert 0 < (yt == data.LESION).mean() < 0.03


# ---------------------------------------------------------------------------------------------------------------
# Metrics on hand-computed cases


def test_dice_hand_computed():
    target = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [2, 2, 0, 0]])
    pred = np.array([[0, 1, 0, 0], [0, 1, 1, 1], [2, 0, 0, 0]])
    counts = metrics.dice_counts(pred, target, 4)
    # class 1: TP 3, FP 1, FN 1 -> 6/8; class 2: TP 1, FN 1 -> 2/3; class 3 absent from both -> 1.
    assert counts[1].tolist() == [3, 1, 1] and counts[2].tolist() == [1, 0, 1]
    dice = metrics.dice_from_counts(counts)
    assert dice[1] == pytest.approx(0.75) and dice[2] == pytest.approx(2 / 3) and dice[3] == 1.0
    # class 0: target 6 voxels, pred 7, TP 5 (FP 2, FN 1) -> 10/13
    assert counts[0].tolist() == [5, 2, 1] and dice[0] == pytest.approx(10 / 13)


def test_lesion_f1_two_true_three_predicted():
    true = np.zeros((12, 12), bool)
    true[1:3, 1:3] = True      # lesion A
    true[8:10, 8:10] = True    # lesion B
    pred = np.zeros_like(true)
    pred[2:4, 2:4] = True      # overlaps A (one voxel)
    pred[5, 5] = True          # false positive
    pred[0, 10:12] = True      # false positive
    c = metrics.lesion_counts(pred, true)
    assert c == {"true": 2, "detected": 1, "pred": 3, "hits": 1}
    f = metrics.f1_from_counts(c)
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert f["precision"] == pytest.approx(1 / 3) and f["recall"] == pytest.approx(0.5)
    assert f["f1"] == pytest.approx(0.4)
    # Diagonal neighbours are one component (8-connectivity).
    diag = np.zeros((4, 4), bool)
    diag[0, 0] = diag[1, 1] = True
    assert metrics.lesion_counts(diag, diag)["true"] == 1


def test_lesion_f1_empty_conventions():
    empty = np.zeros((5, 5), bool)
    one = empty.copy()
    one[2, 2] = True
    assert metrics.f1_from_counts(metrics.lesion_counts(empty, empty))["f1"] == 1.0
    assert metrics.f1_from_counts(metrics.lesion_counts(empty, one))["f1"] == 0.0   # missed
    assert metrics.f1_from_counts(metrics.lesion_counts(one, empty))["f1"] == 0.0   # false alarm


def test_hd95_points_and_cubes():
    # Two single points 3 apart in x, 4 in y: every surface distance is 5 -> HD95 = 5 (and 10 mm at spacing 2).
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[1, 1] = True
    b[5, 4] = True
    assert metrics.hd95(a, b) == pytest.approx(5.0)
    assert metrics.hd95(a, b, (2.0, 2.0)) == pytest.approx(10.0)
    # A 3^3 cube and the same cube shifted by 2 along one axis. Surfaces: all 26 voxels but the centre. From each
    # cube, the 9 voxels of the face away from the other cube are 2 from the nearest surface voxel of the other;
    # the rest are at distance 0 or 1. 9/26 = 35% of the distances are 2, so the 95th percentile is 2.
    c = np.zeros((9, 9, 9), bool)
    d = np.zeros_like(c)
    c[2:5, 2:5, 2:5] = True
    d[4:7, 2:5, 2:5] = True
    assert metrics.hd95(c, d) == pytest.approx(2.0)
    assert metrics.hd95(c, c) == 0.0
    # The cube plus one far voxel: 1 of 27 surface distances is large, inside the top 5 %, so HD95 ignores it
    # (the plain Hausdorff distance would be |(8,8,8) - (4,4,4)|). With two far voxels, 2 of 28: sorted A->B
    # distances end 0, sqrt(41), sqrt(48); numpy's 95th percentile sits at index 0.95 * 27 = 25.65 -> 0.65 sqrt(41).
    e = c.copy()
    e[8, 8, 8] = True
    assert metrics.hd95(e, c) == 0.0
    e[8, 8, 7] = True
    assert metrics.hd95(e, c) == pytest.approx(0.65 * math.sqrt(41))
    assert metrics.hd95(c, e) == pytest.approx(0.65 * math.sqrt(41))  # symmetric


def test_hd95_empty_conventions():
    empty = np.zeros((4, 5), bool)
    one = empty.copy()
    one[1, 1] = True
    assert metrics.hd95(empty, empty) == 0.0
    diag = math.hypot(3, 4)
    assert metrics.hd95(empty, one) == pytest.approx(diag)
    assert metrics.hd95(one, empty, (2.0, 2.0)) == pytest.approx(2 * diag)


def test_evaluate_perfect_prediction(brain):
    from torch_medloss.segdemo import data

    _, y = data.test_set(brain, 2, repeats=1)
    r = metrics.evaluate(y[:3, 0], y[:3, 0], 5, data.LESION, (2.0, 2.0))
    assert r["dice"] == [1.0] * 5 and r["lesion"]["f1"] == 1.0 and r["hd95"][1:] == [0.0] * 4


def test_evaluate_hd95_mean_over_images_with_the_class():
    from torch_medloss.segdemo import report

    # Three 6x6 images, 5 classes (4 = lesion). Class 1: image 0 has a predicted point at (1, 1) and a true one at
    # (4, 5), HD95 = hypot(3, 4) = 5; image 1 has class 1 on neither side (left out, not a 0); image 2 has it only
    # in the target, HD95 = the grid diagonal hypot(5, 5). Mean over the 2 images with class 1: (5 + sqrt 50) / 2,
    # not (5 + 0 + sqrt 50) / 3. Classes 2 and 3 are nowhere: NaN. The lesion is in image 1 only, predicted
    # exactly: 0 over that one image.
    pred = np.zeros((3, 6, 6), np.int64)
    target = np.zeros_like(pred)
    pred[0, 1, 1] = 1
    target[0, 4, 5] = 1
    target[2, 2, 2] = 1
    pred[1, 3:5, 3:5] = target[1, 3:5, 3:5] = 4
    r = metrics.evaluate(pred, target, 5, 4, (1.0, 1.0))
    assert r["hd95"][1] == pytest.approx((5 + math.sqrt(50)) / 2)
    assert math.isnan(r["hd95"][0]) and math.isnan(r["hd95"][2]) and math.isnan(r["hd95"][3])
    assert r["hd95"][4] == 0.0
    # Spacing scales the distances; the NaN stays NaN and the table shows it as "-".
    r2 = metrics.evaluate(pred, target, 5, 4, (2.0, 2.0))
    assert r2["hd95"][1] == pytest.approx(5 + math.sqrt(50))
    summary = report.summarize([r, r2])
    assert math.isnan(summary["hd95"]["GM"]["mean"])
    row = report.markdown_table({"ce": summary}, {"ce": "CE"}).splitlines()[-1].split(" | ")
    assert row[-3:-1] == ["-", "-"] and row[-1] == "0.0 ± 0.0 |"


# ---------------------------------------------------------------------------------------------------------------
# The U-Net


@pytest.mark.parametrize("shape", [(2, 1, 32, 48), (1, 1, 37, 50), (1, 1, 3, 17)])
def test_unet_2d_shapes(shape):
    net = UNet(in_channels=1, num_classes=5, spatial_dims=2, base_channels=4, depth=3)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 5, *shape[2:])


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (2, 1, 9, 13, 11)])
def test_unet_3d_shapes(shape):
    net = UNet(in_channels=1, num_classes=3, spatial_dims=3, base_channels=4, depth=2)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:])


def test_unet_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(spatial_dims=4)
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=-1)
    with pytest.raises(TypeError, match="base_channels"):
        UNet(base_channels=16.0)
    with pytest.raises(ValueError, match=r"expected input \(B, 1, \*S\)"):
        UNet(spatial_dims=2)(torch.randn(1, 2, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("loss_key", ["dicece", "dbce2", "pmdice2"])
def test_tiny_training_loss_falls(brain, loss_key):
    from torch_medloss.segdemo import data, train

    rng = np.random.default_rng(0)
    batch = data.training_batch(brain, rng, 2, 2, 32)
    model, history = train.train_one(loss_key, [batch] * 12, seed=0, dim=2, lr=3e-3, device=torch.device("cpu"))
    assert history[-1] < history[0], history
    pred = train.predict(model, batch[0], torch.device("cpu"))
    assert pred.shape == batch[1][:, 0].shape


def test_training_batches_are_lazy_and_the_same_for_every_loss(brain):
    from torch_medloss.segdemo import data, train

    rng = np.random.default_rng(7)
    eager = [data.training_batch(brain, rng, 2, 2, 24) for _ in range(3)]  # how the CLI drew them before
    for _ in range(2):  # every call (every loss) yields the same stream
        lazy = data.training_batches(brain, 7, 3, 2, 2, 24)
        assert not isinstance(lazy, list)
        got = list(lazy)
        assert len(got) == 3
        for (x, y), (ex, ey) in zip(got, eager, strict=True):
            assert np.array_equal(x, ex) and np.array_equal(y, ey)
    cpu = torch.device("cpu")
    _, from_list = train.train_one("ce", eager, 0, 2, 3e-3, cpu)
    _, from_generator = train.train_one("ce", data.training_batches(brain, 7, 3, 2, 2, 24), 0, 2, 3e-3, cpu,
                                        steps=3)
    assert from_list == from_generator
    with pytest.raises(TypeError, match="give steps"):
        train.train_one("ce", iter(eager), 0, 2, 3e-3, cpu)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        train.train_one("ce", eager, 0, 2, 3e-3, cpu, steps=0)


def test_parse_losses():
    from torch_medloss.segdemo import train

    assert train.parse_losses("ce, DBCE2") == ["ce", "dbce2"]
    with pytest.raises(ValueError, match="unknown loss"):
        train.parse_losses("ce,nope")


def test_cli_help_is_light():
    import subprocess
    import sys

    code = ("import sys, torch_medloss.segdemo.cli as c; "
            "assert not any(m in sys.modules for m in ('nilearn', 'nibabel', 'scipy', 'matplotlib')), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_end_to_end(tmp_path):
    pytest.importorskip("nilearn")
    import json

    from torch_medloss.__main__ import main

    out = tmp_path / "sd"
    rc = main(["segdemo", "--steps", "2", "--seeds", "1", "--batch-size", "2", "--patch", "32", "--losses",
               "ce,pmdice2", "--out", str(out), "--no-progress"])
    assert rc == 0
    payload = json.loads((out / "segdemo.json").read_text())
    assert set(payload["summary"]) == {"ce", "pmdice2"} and payload["settings"]["steps"] == 2
    table = (out / "segdemo.md").read_text()
    assert "| PM Dice g=2 |" in table and "HD95 lesion (mm)" in table
    assert "where the class is in the prediction or the target" in table
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "segdemo.png").stat().st_size > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["--lr=-1e-3"], "argument --lr: expected a finite number > 0"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0"),
    (["--lr", "fast"], "argument --lr: expected a finite number > 0, got 'fast'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--seeds", "two"], "argument --seeds: expected an integer >= 1, got 'two'"),
    (["--threads", "-2"], "argument --threads: expected an integer >= 1"),
    (["--patch", "1.5"], "argument --patch: expected an integer >= 9"),
    (["--patch", "8"], "argument --patch: expected an integer >= 9 (the U-Net's 3 down-samplings need more than 8 "
                       "voxels), got '8'"),
])
def test_cli_bad_numbers(argv, message, capsys):
    from torch_medloss.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["segdemo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bad_device(tmp_path, capsys):
    from torch_medloss.__main__ import main

    bad = ["bogus", "meta", "cuda:x"]
    if torch.cuda.is_available():
        bad.append(f"cuda:{torch.cuda.device_count()}")
    else:
        bad += ["cuda", "cuda:0"]
    for device in bad:
        out = tmp_path / device.replace(":", "_")
        assert main(["segdemo", "--device", device, "--out", str(out), "--no-progress"]) == 2, device
        err = capsys.readouterr().err
        assert "--device" in err and "Traceback" not in err, err
        assert not out.exists()  # refused up front: no folder, no data loaded
    if not torch.cuda.is_available():
        assert main(["segdemo", "--device", "cuda", "--out", str(tmp_path / "c")]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
