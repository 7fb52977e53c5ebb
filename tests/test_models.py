"""The denoisers of torch_medloss.models: parameter budgets, shapes, the LFN wiring, the dual model's bands."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_medloss.functional import frequency_split
from torch_medloss.models import DnCNN, DualFrequencyDenoiser, LatticeFusionNet

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_budgets():
    dncnn = n_params(DnCNN())
    assert dncnn == 556_096  # 640 + 15 * (36,864 + 128) + 576
    lfn = n_params(LatticeFusionNet())
    assert lfn == 286_816 and lfn <= 0.55 * dncnn, (lfn, lfn / dncnn)
    dual = n_params(DualFrequencyDenoiser())
    assert 0.8 * dncnn <= dual <= 1.2 * dncnn, (dual, dual / dncnn)


@pytest.mark.parametrize("image_channels", [1, 3])
@pytest.mark.parametrize("make", [
    lambda c: DnCNN(depth=4, channels=8, image_channels=c),
    lambda c: LatticeFusionNet(rows=2, cols=3, width=6, image_channels=c),
    lambda c: LatticeFusionNet(rows=1, cols=1, width=4, image_channels=c, batch_norm=True, wiring="diagonal"),
    lambda c: DualFrequencyDenoiser(sigma=1.5, depth=3, channels=6, image_channels=c),
], ids=["dncnn", "lfn", "lfn-1x1-bn", "dual"])
def test_shapes_odd_sizes_and_channels_last(make, image_channels):
    model = make(image_channels).eval()
    x = torch.rand(2, image_channels, 13, 7)  # dual radius ceil(4.5) = 5 < 7
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        model_cl = model.to(memory_format=torch.channels_last)
        y_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)  # the format is kept, not silently converted


def test_default_models_run_on_odd_sizes():
    x = torch.rand(1, 1, 9, 11)
    with torch.no_grad():
        for model in (DnCNN(), LatticeFusionNet(), DualFrequencyDenoiser()):
            assert model.eval()(x).shape == x.shape


def _reference_lattice(model, y):
    """The documented wiring, rebuilt with torch.cat + nn.Conv2d carrying the model's weights."""
    head = F.relu(F.conv2d(y, model.head.weight, model.head.bias, padding=1))
    out = {}
    for i in range(model.rows):
        for j in range(model.cols):
            if i == 0 and j == 0:
                inputs = [head]
            else:
                inputs = [out[i - 1, j] if i > 0 else head, out[i, j - 1] if j > 0 else head]
                if model.wiring == "diagonal" and i > 0 and j > 0:
                    inputs.append(out[i - 1, j - 1])
            node = model.nodes[i * model.cols + j]
            conv = nn.Conv2d(sum(node.in_channels), model.width, 3, padding=1, bias=node.bias is not None)
            conv.load_state_dict(node.state_dict())
            z = conv(torch.cat(inputs, 1))
            if model.batch_norm:
                z = model.norms[i * model.cols + j](z)
            out[i, j] = F.relu(z)
    noise = F.conv2d(out[model.rows - 1, model.cols - 1], model.tail.weight, padding=1)
    return y - noise


@pytest.mark.parametrize("wiring", ["grid", "diagonal"])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 3), (3, 2)])
def test_lfn_matches_cat_conv_lattice(rows, cols, wiring, batch_norm):
    model = LatticeFusionNet(rows=rows, cols=cols, width=5, image_channels=2, batch_norm=batch_norm, wiring=wiring)
    if batch_norm:  # non-trivial running statistics and affine parameters
        for norm in model.norms:
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    y = torch.rand(2, 2, 11, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(y), _reference_lattice(model, y), rtol=1e-5, atol=1e-6)


def test_lfn_boundary_fan_in():
    model = LatticeFusionNet(rows=3, cols=3, width=4, wiring="diagonal")
    fan_in = [[len(model.nodes[i * 3 + j].in_channels) for j in range(3)] for i in range(3)]
    assert fan_in == [[1, 2, 2], [2, 3, 3], [2, 3, 3]]
    assert model.sources(0, 0) == [None]
    assert model.sources(0, 2) == [None, (0, 1)]
    assert model.sources(2, 0) == [(1, 0), None]


def _zero_last_conv(net):
    last = [m for m in net if isinstance(m, nn.Conv2d)][-1]
    nn.init.zeros_(last.weight)


def test_dual_bands_feed_the_right_networks():
    torch.manual_seed(1)
    model = DualFrequencyDenoiser(sigma=1.0, depth=3, channels=4).eval()
    y = torch.rand(2, 1, 12, 10)
    low, high = frequency_split(y, 1.0)
    seen = {}
    model.low_net.register_forward_hook(lambda m, args, out: seen.__setitem__("low", args[0]))
    model.high_net.register_forward_hook(lambda m, args, out: seen.__setitem__("high", args[0]))
    with torch.no_grad():
        full = model(y)
        torch.testing.assert_close(seen["low"], low)
        torch.testing.assert_close(seen["high"], high)
        torch.testing.assert_close(full, low - model.low_net(low) + high - model.high_net(high))
        _zero_last_conv(model.high_net)  # high net predicts no noise: the high band passes through
        torch.testing.assert_close(model(y), low - model.low_net(low) + high)
        _zero_last_conv(model.low_net)  # both zero: identity
        torch.testing.assert_close(model(y), y, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="blur radius"):
        DualFrequencyDenoiser()(torch.rand(1, 1, 6, 40))  # radius ceil(3 * 2) = 6
    with pytest.raises(ValueError, match=r"shape \(B, 1, H, W\)"):
        DnCNN()(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        LatticeFusionNet(image_channels=3)(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="wiring must be one of"):
        LatticeFusionNet(wiring="dense")
    with pytest.raises(ValueError, match="rows must be >= 1"):
        LatticeFusionNet(rows=0)
    with pytest.raises(TypeError, match="depth must be an int"):
        DnCNN(depth=17.0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        DualFrequencyDenoiser(sigma=0)
