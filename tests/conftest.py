import os
import subprocess
import sys
import tempfile

import torch

# The Triton tests are ordinary tests: without a GPU they run the kernels on CPU tensors through Triton's
# interpreter, which must be switched on before triton is first imported (nothing has imported it yet here).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import backends  # noqa: E402  (reads TRITON_INTERPRET, set just above)
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
    extension = sys.modules.get("torch_medloss._extension")
    if extension is not None and extension._outcome is not None:
        raise pytest.UsageError("a test module found or built the C++ extension while being collected; ask for it in "
                                "a fixture (tests/backends.py) instead")


# ------------------------------------------------------------------------------- interpreted Triton tests, alongside
# Without a GPU, the Triton tests run the kernels through Triton's interpreter: single-threaded Python, about half of
# the suite's time. When a run selects many of them, they go to a second pytest process that runs at the same time as
# this one (two cores, one busy with the interpreter, the other with the rest), and this session waits for it at the
# end, prints its summary and fails if it failed. They stay ordinary tests: `-k`, a single node id or a small
# selection runs them here, and TORCH_MEDLOSS_TEST_SPLIT=0 keeps them all in this process.

_CHILD_ENV = "TORCH_MEDLOSS_TEST_CHILD"
_SPLIT_ENV = "TORCH_MEDLOSS_TEST_SPLIT"
_SPLIT_AT_LEAST = 200  # tests on each side; with fewer, a second process costs more than it saves
_child: dict = {}


def _interpreted(item) -> bool:
    """A test that runs a Triton kernel through the interpreter: "triton" is a word of its name or parameter ids."""
    words = item.name.replace("[", "-").replace("]", "-").replace("_", "-").split("-")
    return "triton" in words


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if (not backends.INTERPRETING or os.environ.get(_CHILD_ENV) or config.option.collectonly
            or os.environ.get(_SPLIT_ENV, "1") == "0"):
        return
    moved, kept = [], []
    for item in items:
        (moved if _interpreted(item) else kept).append(item)
    if len(moved) < _SPLIT_AT_LEAST or len(kept) < _SPLIT_AT_LEAST:  # nothing to overlap them with
        return
    log = tempfile.NamedTemporaryFile("w+", prefix="torch_medloss-interpreted-", suffix=".log", delete=False)
    env = {**os.environ, _CHILD_ENV: "1", "OMP_NUM_THREADS": "1"}  # the interpreter needs no OpenMP threads
    ids = [item.nodeid for item in moved]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", *ids]
    _child.update(process=subprocess.Popen(command, cwd=str(config.rootpath), env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log=log, count=len(ids))
    items[:] = kept
    sys.stderr.write(f"\ntorch_medloss tests: {len(ids)} Triton-interpreted tests run in a second pytest process "
                     f"alongside this one (output: {log.name}; {_SPLIT_ENV}=0 keeps them here)\n")


def pytest_sessionfinish(session, exitstatus):
    """Wait for the second process; its failure fails this session (exit 5, no test collected, counts as one)."""
    process = _child.get("process")
    if process is None:
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED:  # Ctrl-C: do not wait minutes for the other half
        process.kill()
    _child["code"] = process.wait()
    if _child["code"] != 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    """The second process's failures in full when it failed, else its counts, just above this session's."""
    if "code" not in _child:
        return
    log, code = _child["log"], _child["code"]
    log.seek(0)
    lines = log.read().splitlines()
    terminalreporter.write_sep("=", f"{_child['count']} Triton-interpreted tests (second process, exit code {code}, "
                                    f"output in {log.name})")
    for line in lines[-400:] if code != 0 else lines[-1:]:
        terminalreporter.write_line(line)
