"""python -m torch_medloss denoise: data pipeline, metrics, training loop and the command end to end."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")

from torch_medloss.__main__ import main  # noqa: E402
from torch_medloss.denoise import data, metrics, train  # noqa: E402
from torch_medloss.models import DnCNN, LatticeFusionNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_and_test_images_are_disjoint():
    assert not set(data.TRAIN_IMAGES) & set(data.TEST_IMAGES)
    train_images = [data.load_image(n) for n in data.TRAIN_IMAGES]
    for name in data.TEST_IMAGES:
        test = data.load_image(name)
        assert not any(t.shape == test.shape and np.allclose(t, test) for t in train_images), name


def test_images_are_grey_in_unit_range():
    for name in ("astronaut", "brick"):
        image = data.load_image(name)
        assert image.ndim == 2 and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5


def test_patch_sampler_shapes_range_and_seeding():
    a = data.PatchSampler(sigma=25, patch=17, batch_size=64, seed=3)
    b = data.PatchSampler(sigma=25, patch=17, batch_size=64, seed=3)
    noisy, clean = a.batch()
    assert noisy.shape == clean.shape == (64, 1, 17, 17) and clean.dtype == torch.float32
    assert clean.min() >= 0 and clean.max() <= 1
    std = float((noisy - clean).std())
    assert abs(std - 25 / 255) < 0.1 * 25 / 255, std
    noisy_b, clean_b = b.batch()
    assert torch.equal(noisy, noisy_b) and torch.equal(clean, clean_b)
    assert not torch.equal(a.batch()[1], clean)  # the stream moves on
    assert not torch.equal(data.PatchSampler(25, 17, 64, seed=4).batch()[1], clean)
    with pytest.raises(ValueError, match="patch must be <="):
        data.PatchSampler(25, 400, 2, seed=0)


def test_test_noise_fixed_per_image_and_seed():
    first = data.test_set(25, seed=0, crop=32)
    again = data.test_set(25, seed=0, crop=32)
    other = data.test_set(25, seed=1, crop=32)
    double = data.test_set(50, seed=0, crop=32)
    assert [i.name for i in first] == list(data.TEST_IMAGES)
    for a, b, c, d in zip(first, again, other, double, strict=True):
        assert a.clean.shape == (1, 1, 32, 32)
        assert torch.equal(a.noisy, b.noisy)
        assert not torch.equal(a.noisy, c.noisy)
        torch.testing.assert_close(d.noisy - d.clean, 2 * (a.noisy - a.clean))
    noise = [i.noisy - i.clean for i in first]
    assert not torch.equal(noise[0], noise[1])  # each image has its own field
    whole = data.test_set(15, seed=0)
    assert tuple(whole[2].clean.shape[-2:]) == (303, 384)  # coins, uncropped


def test_psnr_of_known_mse_and_ssim():
    clean = np.zeros((8, 8))
    assert metrics.psnr(clean, clean + 0.1) == pytest.approx(20.0)  # MSE 0.01
    assert metrics.psnr(clean, clean + 0.01) == pytest.approx(40.0)
    assert math.isinf(metrics.psnr(clean, clean))
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a, b = rng.random((20, 30)), rng.random((20, 30))
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0))
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    scores = metrics.score(torch.zeros(1, 1, 9, 9), torch.full((1, 1, 9, 9), -0.5))  # clipped to 0
    assert math.isinf(scores["psnr"]) and scores["ssim"] == pytest.approx(1.0)


def test_learning_rate_schedule():
    config = train.TrainConfig(steps=11, batch_size=1, patch=8, seed=0)
    rates = [train.learning_rate(config, s) for s in range(11)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)
    assert rates[5] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(x > y for x, y in zip(rates, rates[1:], strict=False))


class _FixedBatch:
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.clean = torch.rand(4, 1, 12, 12, generator=generator)
        self.noisy = self.clean + 0.1 * torch.randn(4, 1, 12, 12, generator=generator)

    def batch(self):
        return self.noisy, self.clean


@pytest.mark.parametrize("make", [lambda: DnCNN(depth=3, channels=8), lambda: LatticeFusionNet(2, 2, 8)],
                         ids=["dncnn", "lfn"])
def test_tiny_training_lowers_the_loss(make):
    model = make()
    config = train.TrainConfig(steps=40, batch_size=4, patch=12, seed=0, lr=3e-3)
    log = train.train_model(model, _FixedBatch(), config, torch.device("cpu"), progress=False)
    assert len(log["losses"]) == 40 and log["seconds"] > 0
    assert np.mean(log["losses"][-5:]) < 0.7 * np.mean(log["losses"][:5]), log["losses"]


def test_build_model():
    assert isinstance(train.build_model("dncnn"), DnCNN)
    assert train.build_model("lfn", {"rows": 2}).rows == 2
    with pytest.raises(ValueError, match="model must be one of"):
        train.build_model("unet")


def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "runs"
    common = ["--sigma", "50", "--steps", "2", "--batch-size", "2", "--patch", "12", "--eval-crop", "16",
              "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(["denoise", "train", "--model", "lfn", "--model", "dncnn,dual", *common]) == 0
    trained = capsys.readouterr().out
    for name in ("lfn", "dncnn", "dual"):
        assert (out / f"{name}_sigma50.pt").exists()
        assert f"| {name} |" in trained
    assert "| noisy input |" in trained and "sigma = 50" in trained and "7x7 uniform window" in trained
    assert main(["denoise", "eval", *common]) == 0
    evaluated = capsys.readouterr().out
    assert all(f"| {name} |" in evaluated for name in ("noisy input", "lfn", "dncnn", "dual"))
    report = json.loads((out / "eval_results.json").read_text())
    rows = report["tables"][0]["rows"]
    assert [r["model"] for r in rows] == ["noisy input", "lfn", "dncnn", "dual"]
    trained_rows = json.loads((out / "train_results.json").read_text())["tables"][0]["rows"]
    for a, b in zip(rows, trained_rows, strict=True):  # same weights, same fixed test noise: same scores
        assert a["mean_psnr"] == pytest.approx(b["mean_psnr"], rel=1e-6)
    assert (out / "eval_results.md").read_text().startswith("## denoise eval")
    record = torch.load(out / "dual_sigma50.pt", weights_only=True)
    assert record["args"]["resolved"]["steps"] == 2 and record["params"] > 0


def test_cli_eval_uses_the_checkpoints_test_set(tmp_path, capsys):
    out = tmp_path / "quick"
    fast = ["--steps", "2", "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(["denoise", "train", "--quick", "--seed", "5", "--model", "dncnn,dual", *fast]) == 0
    trained = capsys.readouterr().out
    trained_json = json.loads((out / "train_results.json").read_text())
    assert trained_json["tables"][0]["image_sizes"]["camera"] == [128, 128]  # --quick's crop
    # eval with no flags: the seed and crop of the checkpoints, so the very same numbers as training printed.
    assert main(["denoise", "eval", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert "skipping lfn: no checkpoint" in captured.err  # no --model: the model without checkpoints is named
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert evaluated["tables"][0]["image_sizes"] == trained_json["tables"][0]["image_sizes"]
    assert [r["images"] for r in evaluated["tables"][0]["rows"]] == [r["images"] for r in trained_json["tables"][0]
                                                                    ["rows"]]
    tail = trained[trained.index("| noisy input |"):]
    assert tail.strip() in captured.out and "(seed 5)" in captured.out
    # The same values given explicitly: no warning. Other values: a one-line warning, other numbers.
    assert main(["denoise", "eval", "--out", str(out), "--model", "dncnn", "--seed", "5", "--quick"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["denoise", "eval", "--out", str(out), "--model", "dncnn", "--seed", "6"]) == 0
    err = capsys.readouterr().err
    assert "warning: --seed 6 (training used 5)" in err and "different test set" in err
    assert "--eval-crop" not in err
    other = json.loads((out / "eval_results.json").read_text())["tables"][0]["rows"][1]
    assert other["mean_psnr"] != trained_json["tables"][0]["rows"][1]["mean_psnr"]
    assert main(["denoise", "eval", "--out", str(out), "--model", "dncnn", "--eval-crop", "64"]) == 0
    err = capsys.readouterr().err
    assert "warning: --eval-crop 64 (training used 128)" in err and len(err.splitlines()) == 2  # + "wrote ..."


def test_cli_eval_checkpoints_that_disagree(tmp_path, capsys):
    fast = ["--steps", "1", "--batch-size", "2", "--patch", "12", "--eval-crop", "8", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu"]
    assert main(["denoise", "train", "--model", "lfn", "--seed", "1", *fast]) == 0
    assert main(["denoise", "train", "--model", "dncnn", "--seed", "2", *fast]) == 0
    capsys.readouterr()
    assert main(["denoise", "eval", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "different --seed values" in err and "Traceback" not in err
    assert main(["denoise", "eval", "--out", str(tmp_path), "--seed", "1"]) == 0
    assert "warning: --seed 1 (training used 1, 2)" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["denoise", "eval", "--model", "lfn", "--out", str(tmp_path)]) == 2
    assert "missing checkpoints" in capsys.readouterr().err
    assert main(["denoise", "eval", "--out", str(tmp_path)]) == 2
    assert "missing checkpoints" in capsys.readouterr().err
    assert main(["denoise", "train", "--model", "dual", "--patch", "6", "--out", str(tmp_path)]) == 2
    assert "--patch > its blur radius 6, got 6" in capsys.readouterr().err
    assert main(["denoise", "train", "--model", "lfn", "--patch", "400", "--out", str(tmp_path / "x")]) == 2
    assert "--patch must be <= 172 (the smallest training image side), got 400" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["denoise", "train", "--model", "dncnn", "--patch", "1", "--batch-size", "1", "--out",
                 str(tmp_path / "x")]) == 2
    assert "needs more than one pixel per batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["denoise", "train", "--model", "unet"])
    with pytest.raises(SystemExit):
        main(["denoise", "train", "--sigma", "30"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--eval-crop", "5"], "argument --eval-crop: expected 0 (whole images) or an integer >= 7 (the SSIM window), "
                           "got '5'"),
    (["--eval-crop", "-1"], "argument --eval-crop: expected 0 (whole images) or an integer >= 7"),
    (["--eval-crop", "x"], "argument --eval-crop: expected 0 (whole images) or an integer >= 7"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 9223372036854775807], got '-1'"),
    (["--seed", "2.5"], "argument --seed: expected an integer in [0, "),
    (["--seed", str(2**63)], "argument --seed: expected an integer in [0, "),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--patch", "ten"], "argument --patch: expected an integer >= 1, got 'ten'"),
])
def test_cli_bad_numbers(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["denoise", "train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_accepts_int_spellings():
    from torch_medloss.__main__ import _parser

    args = _parser().parse_args(["denoise", "eval", "--seed", "00", "--eval-crop", "00", "--steps", "007"])
    assert args.seed == 0 and args.eval_crop == 0 and args.steps == 7
    assert _parser().parse_args(["denoise", "eval"]).seed is None  # not given: eval takes the checkpoints' seed
