"""concat_conv2d on every backend that runs here, against a literal ``torch.cat`` + ``F.conv2d``, from one set of
case builders; then ConcatConv2d, the front end's checks and dispatch, and the Triton op's own machinery.

Backends (tests/backends.py): "reference" (split-weight conv2d calls, torch_medloss.reference.concat_conv) and
"triton" (kernels/concat_conv.py through torch_medloss.ops.concat_conv: on a GPU when there is one, else on CPU
tensors through Triton's interpreter, which conftest.py switches on). The reference runs every case in float64,
where the split-weight sum and the convolution of the concatenation differ only by the order of the additions:
values and gradients (every input, the weight, the bias) compare at 1e-12. The Triton kernels take float32,
bfloat16 and float16: float32 compares with the float64 truth at 1e-5 under the interpreter (where tl.dot is
numpy's fp32 matmul) and at 5e-3 of each tensor's scale on a GPU (TF32, cuDNN's default); bf16 and fp16 stay
within twice PyTorch's own error at that dtype (the reference run in it) plus two rounding steps of the largest
magnitude (a ReLU kink can flip a value's mask). Shapes are tiny: the interpreter runs a few programs per case.

The ahead-of-time compile for sm_90 (ptxas, no spills) runs in the one subprocess that compiles every op's kernels
(helpers.compile_check), started in the background when its test is selected.
"""

from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple

import backends
import pytest
import torch
import torch.nn.functional as F

import helpers
from torch_medloss import _backend
from torch_medloss import _contract as K
from torch_medloss.functional.concat_conv import concat_conv2d
from torch_medloss.nn import ConcatConv2d
from torch_medloss.ops import concat_conv as op
from torch_medloss.reference import concat_conv as reference

TIGHT = dict(rtol=1e-12, atol=1e-12)
# Tiny convolutions and interpreted kernels in a loop: one torch thread (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=backends.params("reference", "triton"))
def backend(request):
    return request.param


TRITON_ONLY = pytest.mark.parametrize("backend", backends.params("triton"))
CUDA = pytest.mark.skipif(not (backends.HAS_CUDA and backends.HAS_TRITON), reason="needs a CUDA device and triton")


def _has_nvidia_backend() -> bool:
    if not backends.HAS_TRITON:
        return False
    import triton.backends

    return "nvidia" in triton.backends.backends


@pytest.fixture(scope="module", autouse=True)
def _compile_in_background(request):
    """Start the shared sm_90 compile subprocess now when its test is selected: it compiles on the other core while
    the interpreted tests run (helpers.compile_result)."""
    if any(item.name.startswith("test_triton_compiles_for_sm90") for item in request.session.items) and \
            _has_nvidia_backend():
        helpers.start_compile_checks()


# ---------------------------------------------------------------------------------------------------- case builders


class Case(NamedTuple):
    channels: tuple[int, ...]
    out_channels: int
    ks: int
    padding: int
    batch: int
    height: int
    width: int
    bias: bool
    relu: bool
    layout: str  # "nchw", "nhwc" or "view"
    dtype: torch.dtype  # the Triton run's; the reference runs in float64

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.height + 2 * self.padding - self.ks + 1,
                self.width + 2 * self.padding - self.ks + 1)


FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


def _grid() -> list[Case]:
    """1 to 8 inputs; 1x1 and 3x3; padding 0, 1, 2; bias and ReLU on/off; NCHW, channels_last and strided views;
    fp32, bf16 and fp16 on Triton; odd and size-1 sizes; 1 to 12 output channels. The options cycle so that each
    value meets many others."""
    channels_list = [(3,), (1, 2), (5, 3, 2), (2, 7, 1, 3), (4, 4, 4, 4, 1), (1, 1, 3, 1, 2, 5),
                     (2, 3, 1, 1, 2, 3, 1), (1, 2, 3, 1, 2, 1, 3, 2), (12,), (6, 6)]
    layouts = ["nchw", "nhwc", "view"]
    dtypes = [FP32, FP32, BF16, FP32, FP16, BF16]
    sizes = [(2, 5, 7), (1, 9, 4), (2, 1, 6), (1, 6, 1), (2, 3, 3)]
    cases = []
    for i, channels in enumerate(channels_list):
        for ks, padding in ((3, 1), (1, 0), (3, 2 * (i % 2))):
            j = i + ks + padding
            batch, height, width = sizes[j % len(sizes)]
            if height + 2 * padding < ks or width + 2 * padding < ks:
                height, width = height + 2, width + 2
            cases.append(Case(channels, (5, 3, 1, 12, 7)[j % 5], ks, padding, batch, height, width, j % 2 == 0,
                              j % 3 != 1, layouts[j % 3], dtypes[(i + padding) % len(dtypes)]))
    return cases


# The option grid, on every backend.
CASES = _grid()
# Hand-picked cases for the reference's own function, the front end's variants and ConcatConv2d in float64: 1 to 8
# inputs, odd and size-1 channel counts and spatial sizes, 1x1 and 3x3, padding 0 / 1 / 2.
HAND_PICKED = [
    Case((3,), 5, 3, 1, 2, 7, 5, True, True, "nchw", FP32),
    Case((1, 2), 3, 3, 0, 1, 5, 6, False, False, "nchw", FP32),
    Case((5, 3, 2), 4, 1, 0, 2, 4, 3, True, False, "nhwc", FP32),
    Case((2, 7, 1, 3), 6, 3, 2, 1, 3, 5, True, True, "nhwc", FP32),
    Case((4, 4, 4, 4, 1), 2, 3, 1, 2, 1, 9, False, True, "nchw", FP32),
    Case((1, 1, 3, 1, 2, 5), 1, 1, 0, 1, 6, 1, True, False, "nchw", FP32),
    Case((2, 3, 1, 1, 2, 3, 1), 7, 3, 1, 2, 5, 5, True, True, "nhwc", FP32),
    Case((1, 2, 3, 4, 5, 6, 7, 8), 3, 3, 1, 1, 4, 7, True, False, "nchw", FP32),
    Case((3, 3), 3, 3, 2, 1, 2, 2, False, True, "nhwc", FP32),
]


def _case_id(case: Case) -> str:
    return (f"{len(case.channels)}in-{case.ks}x{case.ks}-p{case.padding}-{case.batch}x{case.height}x{case.width}-"
            f"{case.layout}-{str(case.dtype)[6:]}")


def literal(inputs, weight, bias, padding, relu):
    """The definition: convolve the concatenation."""
    out = F.conv2d(torch.cat(list(inputs), 1), weight, bias, padding=padding)
    return torch.relu(out) if relu else out


def make(case: Case, dtype: torch.dtype, generator, device="cpu"):
    """(inputs, weight, bias) of ``case`` in ``dtype`` on ``device``. "nhwc" is ``.to(channels_last)`` (a 1-channel
    input keeps NCHW strides, which fit both layouts); "view" a channel and column slice of a bigger tensor (no dense
    layout), sliced on the device so that the strides survive."""
    inputs = []
    for c in case.channels:
        if case.layout == "view":
            wide = torch.randn(case.batch, c + 2, case.height, 2 * case.width, generator=generator)
            x = wide.to(dtype).to(device)[:, 1:c + 1, :, ::2]
        else:
            x = torch.randn(case.batch, c, case.height, case.width, generator=generator).to(dtype).to(device)
            if case.layout == "nhwc":
                x = x.to(memory_format=torch.channels_last)
        inputs.append(x)
    fan_in = sum(case.channels) * case.ks
    weight = (torch.randn(case.out_channels, sum(case.channels), case.ks, case.ks, generator=generator) / fan_in)
    bias = torch.randn(case.out_channels, generator=generator) if case.bias else None
    return inputs, weight.to(dtype).to(device), None if bias is None else bias.to(dtype).to(device)


def values_and_grads(fn, inputs, weight, bias, grad_out):
    """fn's output and the gradients of <grad_out, output> for every input, the weight and the bias (leaves that
    keep the inputs' strides: clone() would make a view dense)."""
    leaves = [t.detach().requires_grad_() for t in (*inputs, weight) + ((bias,) if bias is not None else ())]
    n = len(inputs)
    out = fn(leaves[:n], leaves[n], leaves[n + 1] if bias is not None else None)
    return out, torch.autograd.grad(out, leaves, grad_out), leaves


def truth(inputs, weight, bias, padding, relu, grad_out):
    """The literal cat + conv in float64 on the CPU: (output, gradients)."""
    as64 = [t.detach().double().cpu() for t in inputs]
    bias64 = None if bias is None else bias.detach().double().cpu()
    out, grads, _ = values_and_grads(lambda xs, w, b: literal(xs, w, b, padding, relu), as64,
                                     weight.detach().double().cpu(), bias64, grad_out.double().cpu())
    return out, grads


def assert_matches(backend, got, grads, want, want_grads, low_precision=None):
    """Values and gradients against the float64 truth, at the tolerance of the backend and dtype (module docstring).
    ``low_precision``: the reference's (output, gradients) in the same half-precision dtype."""
    names = ["out"] + [f"grad {i}" for i in range(len(grads))]
    pairs = list(zip(names, [got, *grads], [want, *want_grads], strict=True))
    dtype = got.dtype
    if dtype == torch.float64:
        for name, g, w in pairs:
            torch.testing.assert_close(g, w, **TIGHT, msg=lambda m, name=name: f"{backend} {name}: {m}")
        return
    if dtype == torch.float32:
        for name, g, w in pairs:
            g = g.detach().double().cpu()
            if backends.device(backend).type == "cpu":
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
            else:  # TF32 on a GPU
                error, scale = (g - w).abs().max().item(), w.abs().max().item()
                assert error <= 5e-3 * scale + 1e-5, (name, error, scale)
        return
    eps = torch.finfo(dtype).eps
    low = [low_precision[0], *low_precision[1]]
    for (name, g, w), lo in zip(pairs, low, strict=True):
        torch_error = (lo.detach().double().cpu() - w).abs().max().item()
        error = (g.detach().double().cpu() - w).abs().max().item()
        bound = 2 * torch_error + 2 * eps * w.abs().max().item() + 1e-6
        assert error <= bound, f"{name}: error {error:.3g} > 2 x torch's {torch_error:.3g} + floor ({bound:.3g})"


# ------------------------------------------------------------------------------------------------- values and grads


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_literal_cat_conv(backend, case):
    """Values and every gradient on each backend against cat + conv in float64; the output's dtype, shape and layout
    (channels_last where an input that is channels_last and not also NCHW decides; NCHW for NCHW inputs and views),
    each gradient's dtype and shape."""
    dtype = torch.float64 if backend == "reference" else case.dtype
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(len(case.channels) * 10 + case.ks)
    inputs, weight, bias = make(case, dtype, generator, device)
    grad_out = torch.randn(case.out_shape, generator=generator).to(dtype).to(device)
    activation = "relu" if case.relu else None
    got, grads, leaves = values_and_grads(
        lambda xs, w, b: concat_conv2d(xs, w, b, case.padding, activation, backend=backend), inputs, weight, bias,
        grad_out)
    assert got.dtype == dtype and got.shape == case.out_shape and got.device.type == device.type
    decides = case.layout == "nhwc" and max(case.channels) > 1 and case.height * case.width > 1
    expected_layout = torch.channels_last if decides else torch.contiguous_format
    assert got.is_contiguous(memory_format=expected_layout), got.stride()
    for g, leaf in zip(grads, leaves, strict=True):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, (g.shape, g.dtype, leaf.shape, leaf.dtype)
    want, want_grads = truth(inputs, weight, bias, case.padding, case.relu, grad_out)
    low_precision = None
    if dtype in (torch.bfloat16, torch.float16):
        low, low_grads, _ = values_and_grads(lambda xs, w, b: reference.concat_conv2d(xs, w, b, case.padding,
                                                                                      case.relu),
                                             inputs, weight, bias, grad_out)
        low_precision = (low, low_grads)
    assert_matches(backend, got, grads, want, want_grads, low_precision)


@pytest.mark.parametrize("case", HAND_PICKED, ids=_case_id)
def test_reference_front_end_and_module_agree(case):
    """In float64: the reference function, the front end (named and "auto", a list and a tuple) and ConcatConv2d
    (called with the inputs and with one list) give cat + conv's values and gradients, channels_last when the inputs
    are; an upstream gradient scaled by 2 scales every gradient by 2, exactly."""
    generator = torch.Generator().manual_seed(len(case.channels) * 10 + case.ks)
    inputs, weight, bias = make(case, torch.float64, generator)
    grad_out = torch.randn(case.out_shape, dtype=torch.float64, generator=generator)
    want, want_grads = truth(inputs, weight, bias, case.padding, case.relu, grad_out)
    activation = "relu" if case.relu else None
    candidates = {
        "reference": lambda xs, w, b: reference.concat_conv2d(xs, w, b, case.padding, case.relu),
        "concat_conv2d": lambda xs, w, b: concat_conv2d(xs, w, b, case.padding, activation, backend="reference"),
        "concat_conv2d tuple, auto": lambda xs, w, b: concat_conv2d(tuple(xs), w, b, case.padding, activation),
    }
    for name, fn in candidates.items():
        got, grads, _ = values_and_grads(fn, inputs, weight, bias, grad_out)
        assert got.shape == case.out_shape, name
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m, name=name: f"{name} value: {m}")
        for i, (g, e) in enumerate(zip(grads, want_grads, strict=True)):
            torch.testing.assert_close(g, e, **TIGHT, msg=lambda m, name=name, i=i: f"{name} grad {i}: {m}")
        _, twice, _ = values_and_grads(fn, inputs, weight, bias, 2 * grad_out)
        for g, g2 in zip(grads, twice, strict=True):
            assert torch.equal(g2, 2 * g), name
        if case.layout == "nhwc" and min(case.out_shape[1], case.out_shape[2] * case.out_shape[3]) > 1:
            assert got.is_contiguous(memory_format=torch.channels_last), (name, got.stride())
    module = ConcatConv2d(list(case.channels), case.out_channels, case.ks, case.padding, case.bias, activation,
                          backend="reference", dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
        if case.bias:
            module.bias.copy_(bias)
    torch.testing.assert_close(module(*inputs), want, **TIGHT)
    torch.testing.assert_close(module(list(inputs)), want, **TIGHT)


def test_hand_computed_values(backend):
    """Two 1-channel 2x2 inputs, a 1x1 kernel [2, -3], bias 1, ReLU: out = relu(2 a - 3 b + 1), exact (small
    integers: exact in float32 and in TF32 too)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    device = backends.device(backend)
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=dtype, device=device)
    b = torch.tensor([[[[1.0, 0.0], [2.0, 5.0]]]], dtype=dtype, device=device)
    weight = torch.tensor([2.0, -3.0], dtype=dtype, device=device).view(1, 2, 1, 1)
    out = concat_conv2d([a, b], weight, torch.ones(1, dtype=dtype, device=device), padding=0, activation="relu",
                        backend=backend)
    assert out.flatten().tolist() == [0.0, 5.0, 1.0, 0.0]


def test_relu_keeps_nan(backend):
    """ReLU after the bias keeps a NaN as torch.relu does (the Triton kernel asks tl.maximum to propagate it: PTX
    max.f32 alone would return 0), and a NaN input reaches exactly the outputs whose 3x3 window covers it."""
    device = backends.device(backend)
    x = [torch.randn(1, 2, 5, 6), torch.randn(1, 3, 5, 6)]
    x[1][0, 1, 2, 3] = float("nan")
    weight, bias = torch.randn(4, 5, 3, 3), torch.randn(4)
    expected = torch.relu(F.conv2d(torch.cat(x, 1), weight, bias, padding=1))
    got = concat_conv2d([t.to(device) for t in x], weight.to(device), bias.to(device), 1, "relu", backend=backend)
    assert got.isnan().any() and torch.equal(got.isnan().cpu(), expected.isnan()), (got.isnan().sum(),
                                                                                    expected.isnan().sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_gradcheck(seed, channels_last):
    """float64 gradcheck of the reference (the Triton kernels take no float64); it supports double backward."""
    generator = torch.Generator().manual_seed(seed)
    case = Case((2, 1, 3), 2, 3, 1, 1, 4, 3, True, True, "nhwc" if channels_last else "nchw", torch.float64)
    inputs, weight, bias = make(case, torch.float64, generator)
    leaves = [x.requires_grad_() for x in inputs] + [weight.requires_grad_(), bias.requires_grad_()]

    def fn(*args):
        return reference.concat_conv2d(args[:3], args[3], args[4], 1, True)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    if seed == 0 and not channels_last:  # once: the reference supports double backward (the Triton op refuses it)
        assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


def _laid_out(kind, channels, generator, dtype, device, height=5, width=4):
    """(2, channels, H, W): "nchw", "nhwc" (dense channels_last strides, even for 1 channel, as
    torch.empty(memory_format=torch.channels_last) gives), "nhwc1" (.to(channels_last) of a 1-channel tensor: NCHW's
    strides kept, which fit channels_last too) or "view" (a channel and column slice: no dense layout)."""
    x = torch.randn(2, channels, height, width, generator=generator).to(dtype).to(device)
    if kind == "nhwc":
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    if kind == "nhwc1":
        return x.to(memory_format=torch.channels_last)
    if kind == "view":
        wide = torch.randn(2, channels + 2, height, 2 * width, generator=generator).to(dtype).to(device)
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
def test_output_layout_from_all_inputs(backend, layouts, expected):
    """Every backend gives the output the layout output_memory_format picks from all the inputs (a 1-channel
    channels_last first input used to give NCHW), with cat + conv's values and gradients; so does ConcatConv2d."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(len(layouts))
    inputs = [_laid_out(kind, channels, generator, dtype, device) for kind, channels in layouts]
    channels = sum(c for _, c in layouts)
    weight = (torch.randn(3, channels, 3, 3, generator=generator) / 9).to(dtype).to(device)
    bias = torch.randn(3, generator=generator).to(dtype).to(device)
    assert reference.output_memory_format(inputs) == expected
    grad_out = torch.randn(2, 3, 5, 4, generator=generator).to(dtype).to(device)
    want, want_grads = truth(inputs, weight, bias, 1, True, grad_out)
    candidates = [lambda xs, w, b: concat_conv2d(xs, w, b, 1, "relu", backend=backend)]
    if backend == "reference":  # its function, and "auto" (the reference on CPU tensors)
        candidates += [lambda xs, w, b: reference.concat_conv2d(xs, w, b, 1, True),
                       lambda xs, w, b: concat_conv2d(xs, w, b, 1, "relu")]
    for fn in candidates:
        got, grads, _ = values_and_grads(fn, inputs, weight, bias, grad_out)
        assert got.is_contiguous(memory_format=expected), got.stride()
        assert_matches(backend, got, grads, want, want_grads)
    module = ConcatConv2d([c for _, c in layouts], 3, 3, 1, True, "relu", backend=backend, dtype=dtype,
                          device=device)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        got = module(*inputs)
    assert got.is_contiguous(memory_format=expected), got.stride()
    assert_matches(backend, got, [], want, [])


def test_bitwise_deterministic_and_exact_scaling(backend):
    """Two runs give the same output and gradients bit for bit; an upstream gradient scaled by 2 scales every
    gradient by 2 exactly (float32, no rounding to subnormals). On Triton the weight gradient takes two splits here
    (fixed-order partial sums, no atomics); test_triton_small_blocks_tiles_and_splits has several tiles along every
    dimension."""
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(1)
    case = Case((5, 18), 17, 3, 1, 2, 5, 6, True, True, "nhwc", torch.float32)
    inputs, weight, bias = make(case, torch.float32, generator, device)
    grad_out = torch.randn(case.out_shape, generator=generator).to(device).to(memory_format=torch.channels_last)

    def fn(xs, w, b):
        return concat_conv2d(xs, w, b, 1, "relu", backend=backend)

    first, first_grads, _ = values_and_grads(fn, inputs, weight, bias, grad_out)
    again, again_grads, _ = values_and_grads(fn, inputs, weight, bias, grad_out)
    assert torch.equal(first, again) and all(map(torch.equal, first_grads, again_grads)), "two runs differ"
    _, twice, _ = values_and_grads(fn, inputs, weight, bias, 2 * grad_out)
    for i, (g, g2) in enumerate(zip(first_grads, twice, strict=True)):
        assert torch.equal(g2, 2 * g), f"gradient {i} does not scale exactly with the upstream gradient"


def test_only_some_leaves_need_gradients(backend):
    """Only inputs[1] requires a gradient (no weight or bias gradient is computed or returned), and the upstream
    gradient of .sum() is an expanded (stride-0) tensor."""
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(2)
    case = Case((5, 18), 17, 3, 1, 2, 5, 6, False, False, "nhwc", torch.float32)
    inputs, weight, _ = make(case, torch.float32, generator, device)
    xs = [x.clone().requires_grad_(i == 1) for i, x in enumerate(inputs)]
    w = weight.clone()
    concat_conv2d(xs, w, None, 1, None, backend=backend).sum().backward()
    assert xs[0].grad is None and w.grad is None, "a leaf that does not require grad got one"
    x64 = [x.detach().double().cpu().requires_grad_() for x in inputs]
    literal(x64, weight.double().cpu(), None, 1, False).sum().backward()
    assert_matches(backend, xs[1].grad, [], x64[1].grad, [])


def test_module_matches_conv2d_on_backend(backend):
    """ConcatConv2d on each backend: the output, the weight and the bias gradients of nn.Conv2d of the cat with the
    same parameters."""
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, c, 6, 5, generator=generator).to(device).to(memory_format=torch.channels_last)
              for c in (3, 4)]
    module = ConcatConv2d([3, 4], 5, backend=backend, device=device)
    conv = torch.nn.Conv2d(7, 5, 3, padding=1, device=device, dtype=torch.float64)
    conv.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    got = module(*inputs)
    want = torch.relu(conv(torch.cat([x.double() for x in inputs], 1)))
    got.square().sum().backward()
    want.square().sum().backward()
    assert_matches(backend, got, [module.weight.grad, module.bias.grad], want.cpu(),
                   [conv.weight.grad.cpu(), conv.bias.grad.cpu()])


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


def test_op_backends():
    """The op has a Triton and a reference backend (no C++ kernels) and names the one it lacks; the front end and
    ConcatConv2d take their limits from _contract (the messages above)."""
    assert op.BACKENDS == ("triton", "reference")
    assert K.CONCAT_CONV_MAX_INPUTS == 8 and K.CONCAT_CONV_KERNEL_SIZES == (1, 3)
    with pytest.raises(ValueError, match="concat_conv2d has no 'cpp' backend"):
        op.concat_conv2d("cpp", *_good(), 1, False)


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
    interpreter on), float64 "auto" warns once and runs the reference; a named "triton" raises (the op's own check:
    test_triton_op_refuses_float64)."""
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


# ------------------------------------------------------------------------------------------- the Triton op itself


def _kernels():
    """kernels/concat_conv.py, its ops registered and given autograd (torch_medloss.ops.concat_conv)."""
    op._triton_ops()
    return importlib.import_module("torch_medloss.kernels.concat_conv")


@pytest.fixture
def small_blocks(backend, monkeypatch):
    """Triton: blocks of 16 (several pixel, output-channel and channel tiles per input, and tiles past a short
    input's channel count; several reduction steps) and few programs wanted for the weight gradient (several
    splits, a partial last one). Nothing for the reference."""
    if backend != "triton":
        return None
    kernel = _kernels()
    for name in ("_FWD_BLOCK_M", "_FWD_BLOCK_N", "_FWD_BLOCK_K", "_BWD_IN_BLOCK_M", "_BWD_IN_BLOCK_N",
                 "_BWD_IN_BLOCK_K", "_BWD_W_BLOCK_C", "_BWD_W_BLOCK_O", "_BWD_W_BLOCK_P"):
        monkeypatch.setattr(kernel, name, 16)
    monkeypatch.setattr(kernel, "_BWD_W_TARGET_PROGRAMS", 150)
    return kernel


@TRITON_ONLY
@pytest.mark.parametrize("ks, padding, layout, dtype", [(3, 1, "nhwc", torch.float32), (1, 0, "nchw", torch.bfloat16)],
                         ids=["3x3-nhwc-fp32", "1x1-nchw-bf16"])
def test_triton_small_blocks_tiles_and_splits(backend, small_blocks, ks, padding, layout, dtype):
    """With blocks of 16: several tiles along every dimension of every kernel and several weight-gradient splits,
    against cat + conv in float64."""
    case = Case((20, 3), 17, ks, padding, 2, 9, 7, True, True, layout, dtype)
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(1)
    inputs, weight, bias = make(case, dtype, generator, device)
    grad_out = torch.randn(case.out_shape, generator=generator).to(dtype).to(device)
    got, grads, _ = values_and_grads(lambda xs, w, b: op.concat_conv2d(backend, xs, w, b, padding, True), inputs,
                                     weight, bias, grad_out)
    want, want_grads = truth(inputs, weight, bias, padding, True, grad_out)
    low = None
    if dtype != torch.float32:
        low, low_grads, _ = values_and_grads(lambda xs, w, b: reference.concat_conv2d(xs, w, b, padding, True),
                                             inputs, weight, bias, grad_out)
        low = (low, low_grads)
    assert_matches(backend, got, grads, want, want_grads, low)
    # programs per split: 2 out tiles x 9 taps x 2 inputs x 2 channel tiles per input; 126 pixels, several splits
    pixels = case.batch * case.height * case.width
    splits, per_split = small_blocks._splits(2 * 9 * 2 * 2, pixels)
    assert splits > 1 and splits * per_split >= pixels and (splits - 1) * per_split < pixels, (splits, per_split)


@TRITON_ONLY
def test_double_backward_is_refused(backend):
    device = backends.device(backend)
    inputs = [torch.randn(1, c, 4, 5, device=device, requires_grad=True) for c in (2, 3)]
    out = concat_conv2d(inputs, torch.randn(4, 5, 3, 3, device=device), torch.randn(4, device=device), 1, "relu",
                        backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="concat_conv2d's Triton backward does not support double backward"):
        grad.sum().backward()


@TRITON_ONLY
def test_triton_op_refuses_float64(backend):
    device = backends.device(backend)
    doubles = [torch.randn(1, c, 4, 5, dtype=torch.float64, device=device) for c in (2, 3)]
    with pytest.raises(ValueError, match="take float32, bfloat16 or float16, got torch.float64"):
        op._triton_ops().concat_conv2d_triton(doubles, torch.randn(4, 5, 3, 3, dtype=torch.float64, device=device),
                                              None, 1, False)


@TRITON_ONLY
def test_opcheck(backend):
    """The schemas and the autograd registration of the three ops; on a GPU the full opcheck (fake tensors,
    torch.compile's checks). Under the interpreter the kernels would run on fake tensors: schema and autograd
    registration only."""
    device = backends.device(backend)
    ops = op._triton_ops()
    utils = {"test_utils": ("test_schema", "test_autograd_registration")} if device.type == "cpu" else {}
    generator = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, c, 4, 5, generator=generator).to(device) for c in (2, 3)]
    weight, bias = torch.randn(4, 5, 3, 3, generator=generator).to(device), torch.randn(4, generator=generator)
    torch.library.opcheck(ops.concat_conv2d_triton.default, (xs, weight, bias.to(device), 1, True), **utils)
    torch.library.opcheck(ops.concat_conv2d_triton.default, (xs, weight, None, 1, False), **utils)
    out = ops.concat_conv2d_triton(xs, weight, bias.to(device), 1, True)
    bwd_args = (torch.randn_like(out), out, xs, weight, 1, True)
    schema = {"test_utils": ("test_schema",)} if device.type == "cpu" else {}
    torch.library.opcheck(ops.concat_conv2d_bwd_input_triton.default, bwd_args, **schema)
    torch.library.opcheck(ops.concat_conv2d_bwd_weight_triton.default, bwd_args, **schema)


# ------------------------------------------------------------------------------------------ compiled for sm_90, CPU

helpers.compile_check("concat_conv", """
    kernel = load_kernel("concat_conv")
    for dtype, precision, num_inputs, relu in (("bf16", "ieee", 2, True), ("bf16", "ieee", 8, False),
                                               ("fp32", "tf32", 3, True)):
        data = {name: f"*{dtype}" for name in (
            [f"x{k}_ptr" for k in range(8)] + [f"gx{k}_ptr" for k in range(8)]
            + ["out_ptr", "w_ptr", "bias_ptr", "gy_ptr", "y_ptr"])}
        common = dict(NUM_INPUTS=num_inputs, KS=3, RELU=relu, UPCAST=False, INPUT_PRECISION=precision)
        for fn, blocks in (
            (kernel._concat_conv2d_fwd_kernel, dict(HAS_BIAS=True, BLOCK_M=kernel._FWD_BLOCK_M,
                                                    BLOCK_N=kernel._FWD_BLOCK_N, BLOCK_K=kernel._FWD_BLOCK_K)),
            (kernel._concat_conv2d_bwd_input_kernel, dict(BLOCK_M=kernel._BWD_IN_BLOCK_M,
                                                          BLOCK_N=kernel._BWD_IN_BLOCK_N,
                                                          BLOCK_K=kernel._BWD_IN_BLOCK_K)),
            (kernel._concat_conv2d_bwd_weight_kernel, dict(BLOCK_C=kernel._BWD_W_BLOCK_C,
                                                           BLOCK_O=kernel._BWD_W_BLOCK_O,
                                                           BLOCK_P=kernel._BWD_W_BLOCK_P)),
        ):
            registers, spills = ptxas_report(fn, data, {**common, **blocks}, kernel._NUM_WARPS, kernel._NUM_STAGES)
            print(fn.__name__, dtype, num_inputs, registers, spills)
            if spills:
                FAILURES.append(f"{fn.__name__} {dtype} {num_inputs} inputs: {registers} registers, "
                                f"{spills} bytes of spill stores")
""")


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend")
def test_triton_compiles_for_sm90_without_spills():
    """Compile the three kernels ahead of time for an H100 (sm_90a) at the launchers' sizes; no GPU needed.

    The interpreter is lax about types; the compiler is not. ptxas must report no register spills for bf16 (2 and
    8 inputs) and fp32 (3 inputs, TF32 dots) with 3x3 kernels, with and without ReLU.
    """
    output, failures = helpers.compile_result("concat_conv")
    print(output)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------- CUDA

# Realistic Lattice Fusion Network node shapes (the bench's), smaller batches to keep the test quick.
CUDA_SHAPES = [
    ((64, 64), 64, 3, 1, 4, 128, 128),
    ((64, 64, 64), 64, 3, 1, 2, 128, 128),
    ((32, 32, 32, 32), 64, 3, 1, 2, 256, 256),
    ((17, 40, 3), 24, 1, 0, 3, 37, 53),
]


def _cuda_case(channels, out_channels, ks, batch, height, width, dtype, channels_last, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    inputs = [torch.randn(batch, c, height, width, device="cuda", generator=generator, dtype=dtype)
              for c in channels]
    if channels_last:
        inputs = [x.to(memory_format=torch.channels_last) for x in inputs]
    fan_in = sum(channels) * ks * ks
    weight = (torch.randn(out_channels, sum(channels), ks, ks, device="cuda", generator=generator) / fan_in ** 0.5)
    bias = torch.randn(out_channels, device="cuda", generator=generator)
    return inputs, weight.to(dtype), bias.to(dtype)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{len(s[0])}x{s[0][0]}-{s[1]}-k{s[2]}-{s[5]}")
def test_cuda_realistic_shapes_match_reference(shape, dtype):
    """Forward and every gradient on a GPU against the reference in float64, channels_last and NCHW.

    fp32 runs in TF32 (cuDNN's default): the tolerance is 5e-3 of each tensor's largest magnitude. bf16 must stay
    within 2x the error of PyTorch's own bf16 convolution (cuDNN) plus two bf16 rounding steps.
    """
    channels, out_channels, ks, padding, batch, height, width = shape
    triton_op = op._triton_ops().concat_conv2d_triton
    for channels_last in (True, False):
        inputs, weight, bias = _cuda_case(channels, out_channels, ks, batch, height, width, dtype, channels_last)
        out_shape = (batch, out_channels, height + 2 * padding - ks + 1, width + 2 * padding - ks + 1)
        grad_out = torch.randn(out_shape, device="cuda", dtype=dtype)
        got, grads, _ = values_and_grads(lambda xs, w, b: triton_op(xs, w, b, padding, True), inputs, weight, bias,
                                         grad_out)
        ref = lambda xs, w, b: reference.concat_conv2d(xs, w, b, padding, True)  # noqa: E731
        want, want_grads, _ = values_and_grads(ref, [x.double() for x in inputs], weight.double(), bias.double(),
                                               grad_out.double())
        low, low_grads, _ = values_and_grads(ref, inputs, weight, bias, grad_out)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for i, (g, t, lo) in enumerate(zip([got, *grads], [want, *want_grads], [low, *low_grads], strict=True)):
            error = (g.double() - t).abs().max().item()
            scale = t.abs().max().item()
            if dtype == torch.float32:
                assert error <= 5e-3 * scale + 1e-5, (i, channels_last, error, scale)
            else:
                torch_error = (lo.double() - t).abs().max().item()
                bound = 2 * torch_error + 2 * torch.finfo(dtype).eps * scale
                assert error <= bound, (i, channels_last, error, torch_error, scale)


@CUDA
def test_cuda_deterministic_and_compile_fullgraph():
    """Bitwise determinism at a realistic bf16 shape; torch.compile(fullgraph=True) of the front end on the Triton
    backend gives the eager values and gradients."""
    triton_op = op._triton_ops().concat_conv2d_triton
    inputs, weight, bias = _cuda_case((24, 40), 32, 3, 2, 33, 47, torch.bfloat16, True, seed=1)
    grad_out = torch.randn(2, 32, 33, 47, device="cuda", dtype=torch.bfloat16)
    fn = lambda xs, w, b: triton_op(xs, w, b, 1, True)  # noqa: E731
    first, first_grads, _ = values_and_grads(fn, inputs, weight, bias, grad_out)
    again, again_grads, _ = values_and_grads(fn, inputs, weight, bias, grad_out)
    assert torch.equal(first, again) and all(map(torch.equal, first_grads, again_grads))

    compiled = torch.compile(lambda a, b, w, bb: concat_conv2d([a, b], w, bb, 1, "relu", backend="triton"),
                             fullgraph=True)
    a, b = (x.detach().requires_grad_() for x in inputs)
    out = compiled(a, b, weight, bias)
    torch.testing.assert_close(out, first)
    out.backward(grad_out)
    torch.testing.assert_close(a.grad, first_grads[0])
