"""The one dispatch point: names, auto choice, refusals with reasons, one warning per fallback."""

import warnings

import pytest
import torch

from torch_medloss import _backend


def test_auto_picks_reference_when_that_is_all_an_op_has():
    assert _backend.resolve("dice_loss", "auto", torch.device("cpu"), ("reference",)) == "reference"


def test_named_backend_missing_from_op_raises():
    with pytest.raises(ValueError, match=r"dice_loss has no 'triton' backend \(it has: reference\)"):
        _backend.resolve("dice_loss", "triton", torch.device("cpu"), ("reference",))


def test_triton_needs_cuda_tensors_unless_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = _backend.why_unavailable("triton", torch.device("cpu"))
    assert reason is not None and "CUDA tensors" in reason
    with pytest.raises(ValueError, match="backend='triton' cannot run op: Triton kernels need CUDA tensors"):
        _backend.resolve("op", "triton", torch.device("cpu"), ("triton", "reference"))


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="the CUDA backend runs on CUDA tensors"):
        _backend.resolve("op", "cuda", torch.device("cpu"), ("cuda", "reference"))


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device: None if backend == "reference"
                        else "the extension did not build (test)")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="op_x falls back from the cpp backend to the reference: the extension did"):
        assert _backend.resolve("op_x", "auto", torch.device("cpu"), ("cpp", "reference")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        assert _backend.resolve("op_x", "auto", torch.device("cpu"), ("cpp", "reference")) == "reference"


def test_auto_prefers_the_fused_backend_when_it_runs(monkeypatch):
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device: None)
    assert _backend.resolve("op", "auto", torch.device("cpu"), ("cpp", "reference")) == "cpp"
    assert _backend.resolve("op", "auto", torch.device("cuda"), ("triton", "cuda", "reference")) == "triton"
    assert _backend.resolve("op", "auto", torch.device("cuda"), ("cuda", "reference")) == "cuda"


@pytest.mark.parametrize("name", ["auto", "triton", "cuda", "cpp", "reference"])
def test_backend_names(name):
    assert _backend.check_backend_name(name) == name


def test_availability_is_a_compile_time_constant():
    """why_unavailable carries the mark torch.compiler.assume_constant_result gives (set without importing dynamo)."""

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    flags = {name for name in vars(marked) if name.startswith("_dynamo")}
    assert flags and all(getattr(_backend.why_unavailable, name, None) is True for name in flags), flags
