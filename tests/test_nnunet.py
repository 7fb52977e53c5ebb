"""nnU-Net v2 integration (torch_medloss.nnunet): values and gradients equal to nnunetv2's own losses, the trainers'
losses inside nnU-Net's trainer, nnU-Net's lookup of our trainers by name through both routes, the command line and
the benchmark's nnU-Net column.

nnunetv2 comes with the test extra; without it only the tests that do not need it run. The full pipeline (plan,
preprocess, train, predict) is test_smoke_training, opt-in: TORCH_MEDLOSS_NNUNET_SMOKE=1.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_medloss
from torch_medloss.__main__ import main
from torch_medloss.nnunet import discovery
from torch_medloss.nnunet import losses as ours

HERE = Path(__file__).parent
HAS_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(not HAS_NNUNET, reason="nnunetv2 not installed (pip install -e '.[test]')")
CPU = torch.device("cpu")


def _run(loss, logits, target):
    """(value, gradient of the logits) of one call on a fresh leaf copy."""
    logits = logits.detach().clone().requires_grad_(True)
    value = loss(logits, target)
    value.backward()
    return value.detach(), logits.grad


def _assert_same(theirs, mine, logits, target):
    (value, grad), (our_value, our_grad) = _run(theirs, logits, target), _run(mine, logits, target)
    torch.testing.assert_close(our_value, value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, grad, rtol=1e-4, atol=1e-8)


def _labels(shape, num_classes, ignore, generator):
    """Labels (B, 1, *S) in [0, C); ignore "some": a third set to C, "all": every voxel C."""
    labels = torch.randint(0, num_classes, shape, generator=generator)
    if ignore == "some":
        labels = torch.where(torch.rand(shape, generator=generator) < 0.3, num_classes, labels)
    elif ignore == "all":
        labels = torch.full(shape, num_classes)
    return labels


def _python_env(**extra) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------------------------------- without nnunetv2
def test_import_torch_medloss_does_not_import_nnunetv2():
    code = ("import sys, torch_medloss, torch_medloss.nnunet, torch_medloss.nnunet.discovery; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'timm', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_python_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("build, error, match", [
    (lambda: ours.DC_and_CE_loss({}, {}, weight_ce=-1), ValueError, "weight_ce must be >= 0"),
    (lambda: ours.DC_and_CE_loss({}, {}, weight_dice="1"), TypeError, "weight_dice must be a number"),
    (lambda: ours.DC_and_CE_loss({"batch": True}, {}), TypeError, "soft_dice_kwargs has unexpected keys"),
    (lambda: ours.DC_and_CE_loss([], {}), TypeError, "soft_dice_kwargs must be a dict"),
    (lambda: ours.DC_and_CE_loss({}, None), TypeError, "ce_kwargs must be a dict"),
    (lambda: ours.DC_and_CE_loss({}, {}, ignore_label=True), TypeError, "ignore_label must be an int"),
    (lambda: ours.DC_and_BCE_loss({}, {}, use_ignore_label=1), TypeError, "use_ignore_label must be a bool"),
    (lambda: ours.DBCE_and_DC_loss({}, {"radius_mm": 3}), TypeError, "dbce_kwargs has unexpected keys"),
    (lambda: ours.PMDice_and_CE_loss({"clip_tp": 0.1}, {}), ValueError, "clip_tp"),
    (lambda: ours.DeepSupervisionLosses([torch.nn.L1Loss()], [1, 0.5]), ValueError, "same length"),
    (lambda: ours.DeepSupervisionLosses([torch.nn.L1Loss()], [0]), ValueError, "nonzero weight"),
])
def test_bad_arguments_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_targets_say_what_was_expected():
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"label map \(B, 1, \*S\) or \(B, \*S\)"):
        ours.DC_and_CE_loss({}, {})(logits, torch.zeros(2, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 4, \*S\) region masks .* plus the ignore channel"):
        ours.DC_and_BCE_loss({}, {}, use_ignore_label=True)(logits, torch.zeros(2, 3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 2 outputs"):
        ours.DeepSupervisionLosses([torch.nn.L1Loss()] * 2, [1, 0.5])([logits], [logits])


def test_install_and_uninstall_write_and_remove_only_their_module(tmp_path):
    path, written = discovery.install(tmp_path)
    assert written and path == tmp_path / "torch_medloss_nnunet_trainers.py"
    assert path.read_text() == discovery.INSTALLED_MODULE
    assert discovery.install(tmp_path) == (path, False)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "torch_medloss_nnunet_trainers.cpython-311.pyc").write_bytes(b"")
    assert discovery.uninstall(tmp_path) == (path, True)
    assert not path.exists() and not list((tmp_path / "__pycache__").iterdir())
    assert discovery.uninstall(tmp_path) == (path, False)
    path.write_text("class Mine: pass\n")
    with pytest.raises(FileExistsError, match="not overwritten"):
        discovery.install(tmp_path)
    with pytest.raises(FileExistsError, match="left in place"):
        discovery.uninstall(tmp_path)
    assert path.read_text() == "class Mine: pass\n"


def test_the_external_folder_holds_one_re_export_module():
    modules = sorted(p.name for p in discovery.external_folder().glob("*.py") if p.name != "__init__.py")
    assert modules == [f"{discovery.MODULE_NAME}.py"]
    text = (discovery.external_folder() / modules[0]).read_text()
    assert text.startswith("from torch_medloss.nnunet.trainers import *")


@pytest.mark.parametrize("action", ["path", "install", "uninstall"])
def test_cli_says_when_nnunetv2_is_missing(monkeypatch, capsys, action):
    real = importlib.util.find_spec
    monkeypatch.setattr(discovery.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nnunetv2" else real(name, *a))
    assert main(["nnunet", action]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "nnunetv2 is not installed" in err and "pip install 'torch_medloss[nnunet]'" in err


def test_cli_path_sends_old_nnunet_to_install(monkeypatch, capsys):
    monkeypatch.setattr(discovery, "nnunet_version", lambda: discovery.Version("2.7.0"))
    assert main(["nnunet", "path"]) == 1
    assert "nnunetv2 2.7.0 does not read nnUNet_extTrainer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- values against nnunetv2
@needs_nnunet
@pytest.mark.parametrize("dims, batch_dice, dtype, ignore", itertools.product(
    (2, 3), (False, True), (torch.int16, torch.float32), (None, "some", "all")))
def test_dc_and_ce_equals_nnunet(dims, batch_dice, dtype, ignore):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    generator = torch.Generator().manual_seed(dims + 10 * batch_dice)
    spatial = (7, 6) if dims == 2 else (5, 6, 4)
    logits = torch.randn(2, 3, *spatial, generator=generator) * 3
    target = _labels((2, 1, *spatial), 3, ignore, generator).to(dtype)
    # nnU-Net's trainer's arguments.
    args = ({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
    kwargs = {"weight_ce": 1, "weight_dice": 1, "ignore_label": 3 if ignore else None,
              "dice_class": MemoryEfficientSoftDiceLoss}
    _assert_same(DC_and_CE_loss(*args, **kwargs), ours.DC_and_CE_loss(*args, **kwargs), logits, target)


def _nnunet_dice_classes():
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss

    return MemoryEfficientSoftDiceLoss, SoftDiceLoss


@needs_nnunet
@pytest.mark.parametrize("case", ["do_bg", "weights", "no_dice", "no_ce", "label_smoothing", "class_weights",
                                  "class_weights_all_ignored", "soft_dice_class", "clip_tp", "smooth_0"])
def test_dc_and_ce_options_equal_nnunet(case):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    memory_efficient, soft_dice = _nnunet_dice_classes()
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, 3, generator=generator) * 3
    ignore = {"class_weights": "some", "class_weights_all_ignored": "all", "smooth_0": "some"}.get(case)
    target = _labels((2, 1, 5, 6, 3), 3 if case == "smooth_0" else 4, ignore, generator).to(torch.int16)
    dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    ce, kwargs = {}, {"dice_class": memory_efficient}
    fused = True
    if case == "do_bg":
        dice["do_bg"] = True
    elif case == "weights":
        kwargs.update(weight_ce=0.3, weight_dice=1.7)
    elif case == "no_dice":
        kwargs.update(weight_dice=0)
    elif case == "no_ce":
        kwargs.update(weight_ce=0)
    elif case == "label_smoothing":
        ce = {"label_smoothing": 0.1}
    elif case.startswith("class_weights"):
        ce, kwargs["ignore_label"] = {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5])}, 4
    elif case == "soft_dice_class":
        kwargs["dice_class"] = soft_dice
    elif case == "clip_tp":
        dice["clip_tp"], kwargs["dice_class"], fused = 0.5, soft_dice, False
    elif case == "smooth_0":  # class 3 is absent: nnU-Net's clamp of the denominator decides its Dice
        dice["smooth"], kwargs["ignore_label"], fused = 0.0, 4, False
    mine = ours.DC_and_CE_loss(dict(dice), dict(ce), **kwargs)
    assert isinstance(mine.dc, torch_medloss.DiceLoss) == fused
    _assert_same(DC_and_CE_loss(dict(dice), dict(ce), **kwargs), mine, logits, target)


@needs_nnunet
@pytest.mark.parametrize("dims, batch_dice, ignore, dtype", itertools.product(
    (2, 3), (False, True), (False, True), (torch.bool, torch.float32)))
def test_dc_and_bce_equals_nnunet(dims, batch_dice, ignore, dtype):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    memory_efficient, _ = _nnunet_dice_classes()
    generator = torch.Generator().manual_seed(dims + 2 * batch_dice)
    spatial = (7, 6) if dims == 2 else (5, 6, 4)
    logits = torch.randn(2, 3, *spatial, generator=generator) * 3
    target = (torch.rand(2, 3 + ignore, *spatial, generator=generator) < 0.4).to(dtype)
    # nnU-Net's trainer's arguments for region-based training.
    args = ({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False})
    kwargs = {"use_ignore_label": ignore, "dice_class": memory_efficient}
    _assert_same(DC_and_BCE_loss(*args, **kwargs), ours.DC_and_BCE_loss(*args, **kwargs), logits, target)


@needs_nnunet
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_dc_and_ce_also_takes_label_maps_without_the_channel_axis(ignore_label):
    """nnU-Net's DC_and_CE_loss needs (B, 1, *S); ours also takes (B, *S), with the same result."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 5, 6, generator=generator)
    labels = _labels((2, 1, 5, 6), 3, "some" if ignore_label else None, generator)
    args = ({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
    value, grad = _run(DC_and_CE_loss(*args, ignore_label=ignore_label), logits, labels)
    our_value, our_grad = _run(ours.DC_and_CE_loss(*args, ignore_label=ignore_label), logits, labels[:, 0])
    torch.testing.assert_close(our_value, value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, grad, rtol=1e-4, atol=1e-8)


@needs_nnunet
def test_dc_and_bce_with_every_voxel_ignored_equals_nnunet():
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    logits = torch.randn(2, 2, 4, 5)
    target = torch.cat([torch.rand(2, 2, 4, 5) < 0.5, torch.ones(2, 1, 4, 5, dtype=torch.bool)], 1)
    args = ({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False})
    _assert_same(DC_and_BCE_loss(*args, use_ignore_label=True), ours.DC_and_BCE_loss(*args, use_ignore_label=True),
                 logits, target)


@needs_nnunet
@pytest.mark.parametrize("regions", [False, True])
def test_inside_nnunets_deep_supervision_wrapper(regions):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    generator = torch.Generator().manual_seed(5)
    shapes = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    outputs = [torch.randn(2, 3, *s, generator=generator) for s in shapes]
    labels = _labels((2, 1, 8, 8, 8), 3, "some", generator)
    full = torch.cat([labels >= 1, labels == 2, labels == 0, labels == 3], 1) if regions else labels.to(torch.int16)
    targets = [full[..., ::k, ::k, ::k] for k in (1, 2, 4)]
    weights = [4 / 7, 2 / 7, 1 / 7]
    if regions:
        args = ({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False})
        kwargs = {"use_ignore_label": True}
        pair = DC_and_BCE_loss(*args, **kwargs), ours.DC_and_BCE_loss(*args, **kwargs)
    else:
        args = ({"batch_dice": False, "do_bg": False, "smooth": 1e-5, "ddp": False}, {})
        kwargs = {"ignore_label": 3}
        pair = DC_and_CE_loss(*args, **kwargs), ours.DC_and_CE_loss(*args, **kwargs)
    results = []
    for loss in pair:
        leaves = [o.clone().requires_grad_(True) for o in outputs]
        value = DeepSupervisionWrapper(loss, weights)(leaves, targets)
        value.backward()
        results.append((value.detach(), [leaf.grad for leaf in leaves]))
    (value, grads), (our_value, our_grads) = results
    torch.testing.assert_close(our_value, value, rtol=1e-5, atol=1e-6)
    for got, expected in zip(our_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


@needs_nnunet
def test_pm_dice_with_gamma_0_is_nnunets_dice():
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss

    memory_efficient, _ = _nnunet_dice_classes()
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 5, 6, 4, generator=generator) * 3
    labels = _labels((2, 1, 5, 6, 4), 3, "some", generator).to(torch.int16)
    dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    plain = {"gamma": 0.0, "squared_pred": False}
    _assert_same(DC_and_CE_loss(dict(dice), {}, ignore_label=3, dice_class=memory_efficient),
                 ours.PMDice_and_CE_loss(dict(dice), {}, ignore_label=3, **plain), logits, labels)
    regions = torch.cat([labels >= 1, labels == 2, labels == 0, labels == 3], 1)
    dice["do_bg"] = True
    _assert_same(DC_and_BCE_loss({}, dict(dice), use_ignore_label=True, dice_class=memory_efficient),
                 ours.PMDice_and_BCE_loss({}, dict(dice), use_ignore_label=True, **plain), logits, regions)


def test_pm_dice_and_dbce_losses_are_their_terms():
    """PM Dice + CE and Dice + DBCE in nnU-Net's sign: each term is the torch_medloss loss it names."""
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 6, 5, 4, generator=generator) * 3
    labels = _labels((2, 1, 6, 5, 4), 3, "some", generator)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0], ignore_index=3)
    pm = torch_medloss.PMDiceLoss(gamma=2.0, to_onehot_y=True, softmax=True, include_background=False, batch=True,
                                  ignore_index=3)(logits, labels)
    dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    value = ours.PMDice_and_CE_loss(dict(dice), {}, weight_ce=0.5, ignore_label=3)(logits, labels)
    torch.testing.assert_close(value, 0.5 * ce + pm - 1)
    spacing = (2.0, 1.0, 1.0)
    dbce = torch_medloss.DBCELoss(radius=2.5, spacing=spacing, ignore_index=3)(logits, labels)
    plain_dice = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                                        ignore_index=3)(logits, labels)
    loss = ours.DBCE_and_DC_loss(dict(dice), {"radius": 2.5, "spacing": spacing}, ignore_label=3)
    torch.testing.assert_close(loss(logits, labels), dbce + plain_dice - 1)


@pytest.mark.parametrize("name", ["dc_and_ce", "dc_and_ce_ignore", "dc_and_bce_ignore", "pm_dice_and_ce_ignore",
                                  "dbce_and_dc"])
def test_torch_compile_traces_without_graph_breaks(name):
    dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    loss = {"dc_and_ce": lambda: ours.DC_and_CE_loss(dice, {}),
            "dc_and_ce_ignore": lambda: ours.DC_and_CE_loss(dice, {}, ignore_label=3),
            "dc_and_bce_ignore": lambda: ours.DC_and_BCE_loss({}, {**dice, "do_bg": True}, use_ignore_label=True),
            "pm_dice_and_ce_ignore": lambda: ours.PMDice_and_CE_loss(dice, {}, ignore_label=3),
            "dbce_and_dc": lambda: ours.DBCE_and_DC_loss(dice, {"radius": 1.5})}[name]()
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 6, 5, 4, generator=generator)
    labels = _labels((2, 1, 6, 5, 4), 3, "some" if "ignore" in name else None, generator)
    regions = name.startswith("dc_and_bce")
    target = torch.cat([labels >= 1, labels == 2, labels == 0, labels == 3], 1) if regions else labels
    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        (value, grad), (expected, expected_grad) = _run(compiled, logits, target), _run(loss, logits, target)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def _build_kernels_here():
    """Run a fused loss once in this process, so that a first-use build of the C++ kernels (minutes) happens here
    and not inside a subprocess's time limit."""
    ours.DC_and_CE_loss({}, {})(torch.randn(1, 2, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.long))


@needs_nnunet
def test_ddp_batch_dice_equals_nnunet_on_each_rank(tmp_path):
    _build_kernels_here()
    result = subprocess.run([sys.executable, str(HERE / "nnunet_ddp_worker.py"), str(tmp_path)], capture_output=True,
                            text=True, env=_python_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for case in ("labels", "labels_ignore", "regions_ignore"):
            (value, grad), (our_value, our_grad) = results[(case, "theirs")], results[(case, "ours")]
            torch.testing.assert_close(our_value, value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {case}")
            torch.testing.assert_close(our_grad, grad, rtol=1e-4, atol=1e-8, msg=f"rank {rank} {case}")


# ------------------------------------------------------------------------------------------------------- trainers
@pytest.fixture
def nnunet_results(tmp_path, monkeypatch):
    """nnUNetTrainer makes its output folder under nnUNet_results in __init__."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    return tmp_path


def _trainer(cls, kind: str, configuration: str = "3d_fullres"):
    import nnunet_fixtures

    return cls(nnunet_fixtures.plans(), configuration, 0, nnunet_fixtures.dataset_json(kind), device=CPU)


def _network_outputs_and_targets(trainer, generator):
    """Random outputs at each deep-supervision scale and the matching targets, as nnU-Net's data pipeline gives."""
    import nnunet_fixtures

    manager = trainer.label_manager
    patch = list(trainer.configuration_manager.patch_size)
    scales = trainer._get_deep_supervision_scales()
    labels = nnunet_fixtures.label_map((2, 1, *patch), 3, manager.ignore_label, generator)
    target = nnunet_fixtures.regions_of(labels, manager.ignore_label) if manager.has_regions else labels
    shapes = [[round(p * s) for p, s in zip(patch, scale, strict=True)] for scale in scales]
    outputs = [torch.randn(2, manager.num_segmentation_heads, *shape, generator=generator) * 3 for shape in shapes]
    return outputs, nnunet_fixtures.downsample(target, scales)


def _assert_same_deep_supervision(theirs, mine, outputs, targets):
    results = []
    for loss in (theirs, mine):
        leaves = [o.clone().requires_grad_(True) for o in outputs]
        value = loss(leaves, targets)
        value.backward()
        results.append((value.detach(), [leaf.grad for leaf in leaves]))
    (value, grads), (our_value, our_grads) = results
    torch.testing.assert_close(our_value, value, rtol=1e-5, atol=1e-6)
    for got, expected in zip(our_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


@needs_nnunet
@pytest.mark.parametrize("kind", ["labels", "ignore", "regions", "regions_ignore"])
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_dice_ce_trainer_builds_nnunets_default_loss(nnunet_results, kind, configuration):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from torch_medloss.nnunet.trainers import nnUNetTrainerDiceCE

    reference = _trainer(nnUNetTrainer, kind, configuration)
    trainer = _trainer(nnUNetTrainerDiceCE, kind, configuration)
    outputs, targets = _network_outputs_and_targets(trainer, torch.Generator().manual_seed(11))
    _assert_same_deep_supervision(reference._build_loss(), trainer._build_loss(), outputs, targets)


@needs_nnunet
@pytest.mark.parametrize("kind", ["ignore", "regions_ignore"])
def test_pm_dice_trainer_with_gamma_0_builds_nnunets_loss(nnunet_results, kind):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from torch_medloss.nnunet.trainers import nnUNetTrainerPMDice

    class PlainDice(nnUNetTrainerPMDice):
        pm_gamma, pm_squared_pred = 0.0, False

    reference, trainer = _trainer(nnUNetTrainer, kind), _trainer(PlainDice, kind)
    outputs, targets = _network_outputs_and_targets(trainer, torch.Generator().manual_seed(12))
    _assert_same_deep_supervision(reference._build_loss(), trainer._build_loss(), outputs, targets)
    loss = _trainer(nnUNetTrainerPMDice, kind)._build_loss().loss
    assert loss.dc.gamma.item() == 2.0 and loss.dc.squared_pred


@needs_nnunet
def test_dbce_trainers_scale_the_spacing_per_output(nnunet_results):
    from torch_medloss.nnunet.trainers import nnUNetTrainerDBCE, nnUNetTrainerDiceDBCE

    reference_weights = (4 / 6, 2 / 6, 0.0)  # nnU-Net's: 1, 1/2, 0 (the lowest output), normalized
    for cls, dice_weight in ((nnUNetTrainerDBCE, 0.0), (nnUNetTrainerDiceDBCE, 1.0)):
        trainer = _trainer(cls, "ignore")
        loss = trainer._build_loss()
        assert isinstance(loss, ours.DeepSupervisionLosses)
        assert loss.weight_factors == pytest.approx(reference_weights)
        # 3d_fullres spacing (2, 1, 1) mm; the outputs are at scales (1, 1, 1), (1, 1/2, 1/2), (1/2, 1/4, 1/4).
        assert [tuple(term.dbce.spacing) for term in loss.losses] == [(2.0, 1.0, 1.0), (2.0, 2.0, 2.0), (4.0, 4.0, 4.0)]
        assert {term.dbce.radius for term in loss.losses} == {3.0}
        assert {(term.weight_dice, term.ignore_label, term.dbce.ignore_index) for term in loss.losses} == {
            (dice_weight, 3, 3)}
        outputs, targets = _network_outputs_and_targets(trainer, torch.Generator().manual_seed(13))
        assert torch.isfinite(loss(outputs, targets))
    with pytest.raises(ValueError, match="DBCE needs mutually exclusive labels"):
        _trainer(nnUNetTrainerDBCE, "regions")._build_loss()


@needs_nnunet
def test_epoch_variants_keep_nnunets_signature(nnunet_results):
    import inspect

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from torch_medloss.nnunet import trainers

    assert tuple(cls.__name__ for cls in trainers.BASE_TRAINERS) == discovery.BASE_TRAINER_NAMES
    assert len(trainers.__all__) == len(discovery.BASE_TRAINER_NAMES) * (1 + len(discovery.EPOCH_VARIANTS))
    variant = trainers.nnUNetTrainerDiceDBCE_5epochs
    assert variant.__module__ == "torch_medloss.nnunet.trainers" and issubclass(variant, trainers.nnUNetTrainerDiceDBCE)
    trainer = _trainer(variant, "labels")
    assert trainer.num_epochs == 5 and trainer.dice_weight == 1.0
    base = list(inspect.signature(nnUNetTrainer.__init__).parameters)[1:]
    assert list(trainer.my_init_kwargs) == base
    assert _trainer(trainers.nnUNetTrainerPMDice, "labels").num_epochs == _trainer(nnUNetTrainer, "labels").num_epochs


@needs_nnunet
@pytest.mark.parametrize("name, kind", [("nnUNetTrainerPMDice", "ignore"), ("nnUNetTrainerDiceDBCE", "labels"),
                                        ("nnUNetTrainerDiceCE", "regions_ignore")])
def test_one_nnunet_training_step_on_the_cpu(nnunet_results, name, kind):
    """nnU-Net's own train_step (network with deep supervision, our loss, backward, SGD step) on a synthetic batch."""
    from torch_medloss.nnunet import trainers

    torch.manual_seed(0)
    trainer = _trainer(getattr(trainers, name), kind)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    generator = torch.Generator().manual_seed(14)
    patch = list(trainer.configuration_manager.patch_size)
    _, targets = _network_outputs_and_targets(trainer, generator)
    data = torch.randn(2, 1, *patch, generator=generator)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    loss = trainer.train_step({"data": data, "target": targets})["loss"]
    assert loss.shape == () and float(loss) == float(loss)  # a finite number, not NaN
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.network.parameters(), strict=True))


# -------------------------------------------------------------------------------------------------------- discovery
def _lookup(*steps: str, declare_torchvision_ops: bool = False):
    """Run nnunet_lookup.py; returns (torchvision_ops state, one result per step, stdout)."""
    args = [sys.executable, str(HERE / "nnunet_lookup.py"), *steps]
    if declare_torchvision_ops:
        args.append("--declare-torchvision-ops")
    env = _python_env()
    env.pop("nnUNet_extTrainer", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return lines[0]["torchvision_ops"], lines[1:], result.stdout


@pytest.fixture
def restore_installed_module():
    """The tests install into (and remove from) the real nnunetv2; put back what was there."""
    was_installed = discovery.installed_module().exists()
    yield
    if was_installed:
        discovery.install()
    else:
        discovery.uninstall()


@needs_nnunet
def test_nnunet_finds_our_trainers_after_install(restore_installed_module, capsys):
    """The install route, with the torchvision this environment has (in CI: one that fails to import). Then, with the
    module removed, the nnUNet_extTrainer route on that same torchvision: it works only if torchvision imports."""
    assert main(["nnunet", "install"]) == 0
    assert str(discovery.installed_module()) in capsys.readouterr().out
    name = "nnUNetTrainerPMDice_5epochs"
    ops, (first, uninstalled, _, after), _ = _lookup(f"find:{name}", "uninstall", f"ext:{discovery.external_folder()}",
                                                     f"find:{name}")
    assert first == {"step": f"find:{name}", "class": f"torch_medloss.nnunet.trainers.{name}"}
    assert uninstalled == {"step": "uninstall", "removed": True}
    if ops == "broken":  # what the README tells CPU users: nnU-Net's scan of its own trainers fails on torchvision
        assert "torchvision::nms" in after.get("error", ""), after
    else:
        assert after.get("class") == f"torch_medloss.nnunet.trainers.{name}", after


@needs_nnunet
def test_nnunet_finds_our_trainers_through_nnunet_ext_trainer(restore_installed_module):
    """The nnUNet_extTrainer route: nnU-Net imports all of its own trainers first (Primus needs timm and torchvision);
    where torchvision's compiled ops cannot load, the helper declares their schemas so that import gets through."""
    discovery.uninstall()
    assert main(["nnunet", "path"]) == 0
    name = "nnUNetTrainerDBCE_5epochs"
    ops, (_, found, found_again), stdout = _lookup(f"ext:{discovery.external_folder()}", f"find:{name}",
                                                   "find:nnUNetTrainerDiceCE", declare_torchvision_ops=True)
    assert ops in ("loaded", "declared", "absent")
    assert found.get("class") == f"torch_medloss.nnunet.trainers.{name}", found
    assert found_again.get("class") == "torch_medloss.nnunet.trainers.nnUNetTrainerDiceCE", found_again
    assert f"Using trainer '{name}' from: {discovery.external_folder()}" in stdout


# ------------------------------------------------------------------------------------------------------------ bench
@needs_nnunet
def test_bench_nnunet_column_is_nnunets_own_loss():
    from torch_medloss.bench import providers

    generator = torch.Generator().manual_seed(15)
    logits = torch.randn(2, 4, 6, 5, 4, generator=generator)
    labels = torch.randint(0, 4, (2, 1, 6, 5, 4), generator=generator)
    nnunet = providers.build("nnunet", "dice_ce", CPU)
    assert type(nnunet).__module__ == "nnunetv2.training.loss.compound_losses"
    ours_dice_ce = torch_medloss.DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    torch.testing.assert_close(nnunet(logits, labels), ours_dice_ce(logits, labels) - 1)
    dice = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, batch=True)(logits, labels)
    torch.testing.assert_close(providers.build("nnunet", "dice", CPU)(logits, labels), dice - 1)
    with pytest.raises(providers.Unavailable, match="no nnU-Net equivalent"):
        providers.build("nnunet", "pm_dice", CPU)
    with pytest.raises(providers.Unavailable, match="skipped under --quick") as skipped:
        providers.build("nnunet_compiled", "dice_ce", CPU, quick=True)
    assert skipped.value.status == "skipped"
    try:
        compiled = providers.build("nnunet_compiled", "dice_ce", CPU)
        assert isinstance(compiled.dc, torch._dynamo.eval_frame.OptimizedModule)
        assert not isinstance(compiled.ce, torch._dynamo.eval_frame.OptimizedModule)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------ smoke
@needs_nnunet
@pytest.mark.skipif(not os.environ.get("TORCH_MEDLOSS_NNUNET_SMOKE"),
                    reason="about 1-2 minutes on a CPU; opt in with TORCH_MEDLOSS_NNUNET_SMOKE=1")
def test_smoke_training(tmp_path, restore_installed_module):
    """nnU-Net's whole pipeline on a tiny synthetic dataset on the CPU: plan and preprocess, one short epoch of
    nnUNetTrainerPMDice_1epochs (found by name), validation, then nnUNetv2_predict -tr with the same name."""
    discovery.install()
    _build_kernels_here()
    result = subprocess.run([sys.executable, str(HERE / "nnunet_smoke_run.py"), str(tmp_path)], capture_output=True,
                            text=True, env=_python_env(), timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["trainer"] == "torch_medloss.nnunet.trainers.nnUNetTrainerPMDice_1epochs"
    assert summary["predicted"] == ["case0.nii.gz"] and summary["checkpoint"]
    assert 0 <= summary["validation_mean_dice"] <= 1
