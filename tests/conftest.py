import os

import torch

# The Triton tests are ordinary tests: without a GPU they run the kernels on CPU tensors through Triton's
# interpreter, which must be switched on before triton is first imported (nothing has imported it yet here).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis: few examples, no deadline (the first call of an op may build or warm up); CI is a 2-core box.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same seed and leaves the global RNG as it found it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions in a loop (the model and study tests): one torch thread avoids OpenMP barrier stalls on a
    busy 2-core box; the thread count is restored after the module. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_finish(session):
    """Collection never finds, builds or loads the C++ extension (issue 15: a cold ``--collect-only`` takes seconds):
    skip decisions that need it belong in fixtures. A test module that asks at import time fails the run here."""
    extension = __import__("sys").modules.get("torch_medloss._extension")
    if extension is not None and extension._outcome is not None:
        raise pytest.UsageError("a test module found or built the C++ extension while being collected; ask for it in "
                                "a fixture (tests/backends.py) instead")
