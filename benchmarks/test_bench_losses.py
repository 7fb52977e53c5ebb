"""pytest-benchmark suite over the providers of ``python -m torch_medloss bench``:

    pytest benchmarks --benchmark-only [--benchmark-json PATH]

Outside the CI run on purpose (pyproject's testpaths is tests/). One workload per device: the first default of
``--quick`` (GPU: 3D fp32 B2 C4 128^3; CPU: 3D fp32 B2 C4 32^3). A provider that cannot run here is skipped with its
reason; torch.compile is left out on a CPU (compiling dominates; the bench command measures it).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from torch_medloss.bench import providers
from torch_medloss.bench.workloads import LOSSES, default_providers, default_workloads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOAD = default_workloads(DEVICE, quick=True)[0]


@pytest.fixture(scope="module")
def inputs():
    return WORKLOAD.make_inputs(DEVICE)


@pytest.mark.parametrize("provider", default_providers(DEVICE))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_forward_backward(benchmark, inputs, loss, provider):
    logits, labels = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = providers.build(provider, loss, DEVICE, quick=DEVICE.type == "cpu")
        except providers.Unavailable as exc:
            pytest.skip(str(exc))

        def step():
            logits.grad = None
            module(logits, labels).backward()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        step()  # warm-up (compilation, extension load)
        benchmark.extra_info.update(workload=WORKLOAD.label, loss=LOSSES[loss].label,
                                    implementation=providers.LABELS[provider], torch=torch.__version__)
        benchmark(step)
    logits.grad = None
