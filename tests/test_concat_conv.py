"""Tests of concat_conv2d's reference, front end and ConcatConv2d against a literal ``torch.cat`` + ``F.conv2d``.

Everything here runs on CPU in float64, where the split-weight sum of the reference and the convolution of the
concatenation differ only by the order of the additions, so values and gradients (every input, the weight, the
bias) compare at 1e-12. The Triton kernels are tested in tests/test_concat_conv_triton.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from torch_medloss import _backend
from torch_medloss.functional.concat_conv import concat_conv2d
from torch_medloss.nn import ConcatConv2d
from torch_medloss.reference import concat_conv as reference

TIGHT = dict(rtol=1e-12, atol=1e-12)


def literal(inputs, weight, bias, padding, relu):
    """The definition: convolve the concatenation."""
    out = F.conv2d(torch.cat(list(inputs), 1), weight, bias, padding=padding)
    return torch.relu(out) if relu else out


def make_case(channels, out_channels, ks, batch, height, width, bias, channels_last, generator):
    inputs = [torch.randn(batch, c, height, width, dtype=torch.float64, generator=generator) for c in channels]
    if channels_last:
        inputs = [x.to(memory_format=torch.channels_last) for x in inputs]
    weight = torch.randn(out_channels, sum(channels), ks, ks, dtype=torch.float64, generator=generator)
    b = torch.randn(out_channels, dtype=torch.float64, generator=generator) if bias else None
    return inputs, weight, b


def values_and_grads(fn, inputs, weight, bias, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs] + [weight.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    n = len(inputs)
    out = fn(leaves[:n], leaves[n], leaves[n + 1] if bias is not None else None)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


# (channels per input, out channels, kernel size, padding, batch, H, W, bias, relu, channels_last): 1 to 8 inputs,
# odd and size-1 channel counts, odd and size-1 spatial sizes, 1x1 and 3x3, padding 0 / 1 / 2.
CASES = [
    ((3,), 5, 3, 1, 2, 7, 5, True, True, False),
    ((1, 2), 3, 3, 0, 1, 5, 6, False, False, False),
    ((5, 3, 2), 4, 1, 0, 2, 4, 3, True, False, True),
    ((2, 7, 1, 3), 6, 3, 2, 1, 3, 5, True, True, True),
    ((4, 4, 4, 4, 1), 2, 3, 1, 2, 1, 9, False, True, False),
    ((1, 1, 3, 1, 2, 5), 1, 1, 0, 1, 6, 1, True, False, False),
    ((2, 3, 1, 1, 2, 3, 1), 7, 3, 1, 2, 5, 5, True, True, True),
    ((1, 2, 3, 4, 5, 6, 7, 8), 3, 3, 1, 1, 4, 7, True, False, False),
    ((3, 3), 3, 3, 2, 1, 2, 2, False, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}in-{c[2]}x{c[2]}-p{c[3]}")
def test_reference_front_end_and_module_match_literal_cat_conv(case):
    channels, out_channels, ks, padding, batch, height, width, bias, relu, channels_last = case
    generator = torch.Generator().manual_seed(len(channels) * 10 + ks)
    inputs, weight, b = make_case(channels, out_channels, ks, batch, height, width, bias, channels_last, generator)
    expected, expected_grads = None, None
    out_shape = (batch, out_channels, height + 2 * padding - ks + 1, width + 2 * padding - ks + 1)
    grad_out = torch.randn(out_shape, dtype=torch.float64, generator=generator)
    expected, expected_grads = values_and_grads(lambda xs, w, bb: literal(xs, w, bb, padding, relu), inputs, weight,
                                                b, grad_out)
    candidates = {
        "reference": lambda xs, w, bb: reference.concat_conv2d(xs, w, bb, padding, relu),
        "concat_conv2d": lambda xs, w, bb: concat_conv2d(xs, w, bb, padding, "relu" if relu else None,
                                                         backend="reference"),
        "concat_conv2d tuple, auto": lambda xs, w, bb: concat_conv2d(tuple(xs), w, bb, padding,
                                                                     "relu" if relu else None),
    }
    for name, fn in candidates.items():
        got, grads = values_and_grads(fn, inputs, weight, b, grad_out)
        assert got.shape == out_shape, name
        torch.testing.assert_close(got, expected, **TIGHT, msg=lambda m, name=name: f"{name} value: {m}")
        for i, (g, e) in enumerate(zip(grads, expected_grads, strict=True)):
            torch.testing.assert_close(g, e, **TIGHT, msg=lambda m, name=name, i=i: f"{name} grad {i}: {m}")
        # The upstream gradient scaled by 2 scales every gradient by 2, exactly.
        _, twice = values_and_grads(fn, inputs, weight, b, 2 * grad_out)
        for g, g2 in zip(grads, twice, strict=True):
            assert torch.equal(g2, 2 * g), name
    # All inputs channels_last: so is the output (output_memory_format; see test_output_layout_from_all_inputs).
    if channels_last and min(out_shape[1], out_shape[2] * out_shape[3]) > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)

    module = ConcatConv2d(list(channels), out_channels, ks, padding, bias, "relu" if relu else None,
                          backend="reference", dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias:
            module.bias.copy_(b)
    torch.testing.assert_close(module(*inputs), expected, **TIGHT)
    torch.testing.assert_close(module(list(inputs)), expected, **TIGHT)


def test_reference_is_exact_on_hand_computed_values():
    """Two 1-channel 2x2 inputs, a 1x1 kernel [2, -3], bias 1, ReLU: out = relu(2 a - 3 b + 1)."""
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    b = torch.tensor([[[[1.0, 0.0], [2.0, 5.0]]]], dtype=torch.float64)
    weight = torch.tensor([2.0, -3.0], dtype=torch.float64).view(1, 2, 1, 1)
    out = concat_conv2d([a, b], weight, torch.ones(1, dtype=torch.float64), padding=0, activation="relu")
    assert out.flatten().tolist() == [0.0, 5.0, 1.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_gradcheck(seed, channels_last):
    generator = torch.Generator().manual_seed(seed)
    inputs, weight, b = make_case((2, 1, 3), 2, 3, 1, 4, 3, True, channels_last, generator)
    leaves = [x.requires_grad_() for x in inputs] + [weight.requires_grad_(), b.requires_grad_()]

    def fn(*args):
        return reference.concat_conv2d(args[:3], args[3], args[4], 1, True)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    if seed == 0 and not channels_last:  # once: the reference supports double backward (the Triton op refuses it)
        assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


# ------------------------------------------------------------------------------------------------ ConcatConv2d


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_module_parameters_match_conv2d(kernel_size, bias):
    module = ConcatConv2d([3, 5, 2], 4, kernel_size, bias=bias, activation=None, backend="reference")
    conv = torch.nn.Conv2d(10, 4, kernel_size, padding=kernel_size // 2, bias=bias)
    assert [(k, tuple(v.shape)) for k, v in module.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in conv.state_dict().items()]
    conv.load_state_dict(module.state_dict())
    inputs = [torch.randn(2, c, 6, 5) for c in (3, 5, 2)]
    torch.testing.assert_close(module(*inputs), conv(torch.cat(inputs, 1)), rtol=1e-5, atol=1e-5)
    # nn.Conv2d's initialization bounds, with the fan-in of all inputs together.
    bound = 1 / (10 * kernel_size * kernel_size) ** 0.5
    assert module.weight.abs().max() <= bound
    if bias:
        assert module.bias.abs().max() <= bound


def test_module_relu_default_and_errors():
    module = ConcatConv2d([2, 3], 4, backend="reference")
    a, b = torch.randn(1, 2, 5, 5), torch.randn(1, 3, 5, 5)
    out = module(a, b)
    assert out.shape == (1, 4, 5, 5) and out.min() >= 0
    torch.testing.assert_close(out, module([a, b]))
    with pytest.raises(ValueError, match="ConcatConv2d expects 2 inputs, got 1"):
        module(a)
    with pytest.raises(ValueError, match=r"input 1 must have 3 channels, got shape \(1, 4, 5, 5\)"):
        module(a, torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match="in_channels must be a sequence of ints"):
        ConcatConv2d(3, 4)
    with pytest.raises(ValueError, match="in_channels must have 1 to 8 entries, got 9"):
        ConcatConv2d([1] * 9, 4)
    with pytest.raises(ValueError, match=r"in_channels\[1\] must be >= 1, got 0"):
        ConcatConv2d([1, 0], 4)
    with pytest.raises(TypeError, match="out_channels must be an int, got float"):
        ConcatConv2d([1, 2], 4.0)
    with pytest.raises(ValueError, match="kernel_size must be 1 or 3, got 5"):
        ConcatConv2d([1, 2], 4, 5)
    with pytest.raises(ValueError, match=r"padding must be None or an int in \[0, 0\], got 1"):
        ConcatConv2d([1, 2], 4, 1, padding=1)
    for kernel_size in ("3", 3.0):
        with pytest.raises(TypeError, match="kernel_size must be an int, 1 or 3"):
            ConcatConv2d([1, 2], 4, kernel_size)
    with pytest.raises(TypeError, match="padding must be None or an int, got float"):
        ConcatConv2d([1, 2], 4, padding=1.0)
    with pytest.raises(TypeError, match="bias must be a bool, got str"):
        ConcatConv2d([1, 2], 4, bias="no")
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        ConcatConv2d([1, 2], 4, activation="gelu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ConcatConv2d([1, 2], 4, backend="cudnn")


# ------------------------------------------------------------------------------------------------ bad arguments


def _good():
    return [torch.randn(2, 3, 5, 5), torch.randn(2, 2, 5, 5)], torch.randn(4, 5, 3, 3), torch.randn(4)


BAD = [
    (TypeError, "inputs must be a sequence", lambda x, w, b: concat_conv2d(x[0], w, b)),
    (TypeError, "inputs must be a sequence", lambda x, w, b: concat_conv2d(iter(x), w, b)),
    (ValueError, "inputs must hold 1 to 8 tensors, got 0", lambda x, w, b: concat_conv2d([], w, b)),
    (ValueError, "inputs must hold 1 to 8 tensors, got 9",
     lambda x, w, b: concat_conv2d([x[0]] * 9, torch.randn(4, 27, 3, 3), b)),
    (TypeError, r"inputs\[1\] must be a torch.Tensor, got ndarray", lambda x, w, b: concat_conv2d([x[0], x[1].numpy()],
                                                                                               w, b)),
    (TypeError, r"inputs\[0\] must be a floating tensor .* got torch.int64",
     lambda x, w, b: concat_conv2d([x[0].long(), x[1]], w, b)),
    (ValueError, r"inputs\[1\] must have shape \(B, C, H, W\), got \(2, 2, 5\)",
     lambda x, w, b: concat_conv2d([x[0], x[1][..., 0]], w, b)),
    (ValueError, r"inputs\[0\] must have at least one channel",
     lambda x, w, b: concat_conv2d([x[0][:, :0], x[1]], w, b)),
    (TypeError, r"inputs must share one dtype: inputs\[0\] is torch.float32, inputs\[1\] is torch.float64",
     lambda x, w, b: concat_conv2d([x[0], x[1].double()], w, b)),
    (ValueError, r"inputs must share batch and spatial size .* inputs\[1\] has \(2, 2, 5, 4\)",
     lambda x, w, b: concat_conv2d([x[0], x[1][..., :4]], w, b)),
    (ValueError, r"inputs must share batch and spatial size .* inputs\[1\] has \(1, 2, 5, 5\)",
     lambda x, w, b: concat_conv2d([x[0], x[1][:1]], w, b)),
    (TypeError, "weight must be a torch.Tensor, got list", lambda x, w, b: concat_conv2d(x, w.tolist(), b)),
    (TypeError, "weight must have the inputs' dtype torch.float32, got torch.float64",
     lambda x, w, b: concat_conv2d(x, w.double(), b)),
    (ValueError, r"weight must have shape \(out_channels, 5, K, K\) for inputs with \[3, 2\] channels, got "
                 r"\(4, 6, 3, 3\)", lambda x, w, b: concat_conv2d(x, torch.randn(4, 6, 3, 3), b)),
    (ValueError, r"weight must have shape .* got \(4, 5, 3, 1\)", lambda x, w, b: concat_conv2d(x, w[..., :1], b)),
    (ValueError, "weight must be a 1x1 or 3x3 kernel, got 5x5",
     lambda x, w, b: concat_conv2d(x, torch.randn(4, 5, 5, 5), b)),
    (TypeError, "bias must be a torch.Tensor or None, got list", lambda x, w, b: concat_conv2d(x, w, b.tolist())),
    (TypeError, "bias must have the inputs' dtype torch.float32, got torch.float64",
     lambda x, w, b: concat_conv2d(x, w, b.double())),
    (ValueError, r"inputs of size 2x2 with padding=0 are smaller than the 3x3 kernel",
     lambda x, w, b: concat_conv2d([x[0][..., :2, :2], x[1][..., :2, :2]], w, b, 0)),
    (ValueError, r"bias must have shape \(4,\), got \(3,\)", lambda x, w, b: concat_conv2d(x, w, b[:3])),
    (TypeError, "padding must be an int, got float", lambda x, w, b: concat_conv2d(x, w, b, padding=1.0)),
    (TypeError, "padding must be an int, got bool", lambda x, w, b: concat_conv2d(x, w, b, padding=True)),
    (ValueError, r"padding must be in \[0, 2\] for a 3x3 kernel, got 3", lambda x, w, b: concat_conv2d(x, w, b, 3)),
    (ValueError, r"padding must be in \[0, 0\] for a 1x1 kernel, got 1",
     lambda x, w, b: concat_conv2d(x, w[..., :1, :1], b, 1)),
    (ValueError, r"padding must be in \[0, 2\] for a 3x3 kernel, got -1", lambda x, w, b: concat_conv2d(x, w, b, -1)),
    (TypeError, "activation must be None or 'relu', got int",
     lambda x, w, b: concat_conv2d(x, w, b, activation=1)),
    (ValueError, "activation must be None or 'relu', got 'tanh'",
     lambda x, w, b: concat_conv2d(x, w, b, activation="tanh")),
    (TypeError, "backend must be a str", lambda x, w, b: concat_conv2d(x, w, b, backend=None)),
    (ValueError, "backend must be one of", lambda x, w, b: concat_conv2d(x, w, b, backend="cpp2")),
    (ValueError, "concat_conv2d has no 'cpp' backend", lambda x, w, b: concat_conv2d(x, w, b, backend="cpp")),
]


@pytest.mark.parametrize("error, pattern, call", BAD, ids=[f"{i}-{e.__name__}" for i, (e, _, _) in enumerate(BAD)])
def test_bad_arguments_raise(error, pattern, call):
    inputs, weight, bias = _good()
    with pytest.raises(error, match=pattern):
        call(inputs, weight, bias)


# --------------------------------------------------------------------------------------------------- dispatch


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, weight, bias = _good()
    with pytest.raises(ValueError, match="backend='triton' cannot run concat_conv2d: Triton kernels need CUDA"):
        concat_conv2d(inputs, weight, bias, backend="triton")
    # "auto" on CPU tensors is the reference, without a warning (there is no CPU kernel to fall back from).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(concat_conv2d(inputs, weight, bias), literal(inputs, weight, bias, 1, False))
        doubles = [x.double() for x in inputs]
        concat_conv2d(doubles, weight.double(), bias.double())


def test_float64_is_a_fusion_blocker_where_triton_could_run(monkeypatch):
    """Where "auto" would run Triton (as on a GPU: faked here by putting Triton first in the CPU order, with the
    interpreter on), float64 "auto" warns once and runs the reference; a named "triton" raises.
    tests/test_concat_conv_triton.py checks the same with the real kernels module."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device: None)
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("triton", "cpp", "reference"))
    monkeypatch.setattr(_backend, "_warned", set())
    inputs, weight, bias = (t.double() if isinstance(t, torch.Tensor) else [x.double() for x in t] for t in _good())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = concat_conv2d(inputs, weight, bias, activation="relu")
        concat_conv2d(inputs, weight, bias, activation="relu")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "float64" in messages[0] and "reference" in messages[0], messages
    torch.testing.assert_close(first, literal(inputs, weight, bias, 1, True), **TIGHT)
    with pytest.raises(ValueError, match="backend='triton' cannot run concat_conv2d: .*not float64"):
        concat_conv2d(inputs, weight, bias, backend="triton")


# ------------------------------------------------------------------------------------------------------ autocast


def test_autocast_casts_like_conv2d():
    """Inside torch.autocast the op runs in the autocast dtype, as conv2d does, so an autocast network built on
    ConcatConv2d (bf16 activations, fp32 parameters) works; the result matches cat + conv2d under autocast."""
    from torch_medloss.models import LatticeFusionNet

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, c, 6, 7, generator=generator) for c in (3, 2)]
    weight = torch.randn(4, 5, 3, 3, generator=generator)
    bias = torch.randn(4, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = concat_conv2d(inputs, weight, bias, 1, "relu")
        expected = torch.relu(F.conv2d(torch.cat(inputs, 1), weight, bias, padding=1))
        model_out = LatticeFusionNet(rows=2, cols=2, width=8)(torch.rand(1, 1, 9, 10, generator=generator))
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=5e-2)
    assert model_out.shape == (1, 1, 9, 10) and torch.isfinite(model_out).all()
    # float64 is not an autocast dtype: left alone, as autocast leaves it for conv2d.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert concat_conv2d([x.double() for x in inputs], weight.double(), None).dtype == torch.float64


def _laid_out(kind, channels, generator, height=5, width=4):
    """(2, channels, H, W) float64: "nchw", "nhwc" (dense channels_last strides, even for 1 channel, as
    torch.empty(memory_format=torch.channels_last) gives), "nhwc1" (.to(channels_last) of a 1-channel tensor: NCHW's
    strides kept, which fit channels_last too) or "view" (a channel and column slice: no dense layout)."""
    x = torch.randn(2, channels, height, width, dtype=torch.float64, generator=generator)
    if kind == "nhwc":
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    if kind == "nhwc1":
        return x.to(memory_format=torch.channels_last)
    if kind == "view":
        wide = torch.randn(2, channels + 2, height, 2 * width, dtype=torch.float64, generator=generator)
        return wide[:, 1:channels + 1, :, ::2]
    return x


# (layout, channels) per input -> the output layout: the first input densely in one layout but not both decides.
LAYOUT_CASES = [
    ((("nhwc", 1), ("nhwc", 4)), torch.channels_last),  # the case: a 1-channel image first
    ((("nhwc1", 1), ("nhwc", 3), ("nchw", 2)), torch.channels_last),
    ((("view", 3), ("nhwc", 2)), torch.channels_last),
    ((("nchw", 1), ("nchw", 3), ("nhwc", 2)), torch.contiguous_format),
    ((("nhwc", 2), ("nchw", 3)), torch.channels_last),
    ((("nchw", 2), ("nhwc", 3)), torch.contiguous_format),
    ((("nhwc", 1), ("nhwc1", 1)), torch.contiguous_format),  # nothing decides
    ((("view", 2),), torch.contiguous_format),
]


@pytest.mark.parametrize("layouts, expected", LAYOUT_CASES, ids=lambda v: "-".join(f"{k}{c}" for k, c in v)
                         if isinstance(v, tuple) else str(v).split(".")[-1])
def test_output_layout_from_all_inputs(layouts, expected):
    """Every backend runnable here gives the output the layout output_memory_format picks from all the inputs (a
    1-channel channels_last first input used to give NCHW), with the literal cat + conv's values and gradients."""
    generator = torch.Generator().manual_seed(len(layouts))
    inputs = [_laid_out(kind, channels, generator) for kind, channels in layouts]
    channels = sum(c for _, c in layouts)
    weight = torch.randn(3, channels, 3, 3, dtype=torch.float64, generator=generator)
    bias = torch.randn(3, dtype=torch.float64, generator=generator)
    assert reference.output_memory_format(inputs) == expected
    grad_out = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator)

    def run(fn):  # values_and_grads, with leaves that keep the inputs' strides (clone() makes a view dense)
        leaves = [x.detach().requires_grad_() for x in (*inputs, weight, bias)]
        out = fn(leaves[:-2], leaves[-2], leaves[-1])
        return out, torch.autograd.grad(out, leaves, grad_out)

    want, want_grads = run(lambda xs, w, b: literal(xs, w, b, 1, True))
    for fn in (lambda xs, w, b: reference.concat_conv2d(xs, w, b, 1, True),
               lambda xs, w, b: concat_conv2d(xs, w, b, 1, "relu")):
        got, grads = run(fn)
        assert got.is_contiguous(memory_format=expected), got.stride()
        torch.testing.assert_close(got, want, **TIGHT)
        for g, e in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, e, **TIGHT)
    module = ConcatConv2d([c for _, c in layouts], 3, 3, 1, True, "relu", dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        got = module(*inputs)
    assert got.is_contiguous(memory_format=expected), got.stride()
    torch.testing.assert_close(got, want.detach(), **TIGHT)
