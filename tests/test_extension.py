"""Finding, building and loading the extension (torch_medloss._extension).

What a build says (one line before, one after, a line per file for the build command, the log of a failed build),
the lock that makes concurrent first uses build once, and the two ways never to compile on a compute node: a cache
prepared with ``python -m torch_medloss build`` and a wheel that carries the library.

Most tests build a csrc/ of their own (a file or two without torch headers: seconds) into a temporary cache. The
two cluster routes use the real extension in the cache the other C++ tests use, which the session builds once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from torch_medloss import _extension

REPO = Path(__file__).resolve().parents[1]
TINY = "int torch_medloss_tiny_{name}() {{ return 1; }}\n"


def tiny_csrc(root: Path, *names: str, text: str = TINY) -> Path:
    """A csrc/ with one small file per name in cpu/ (no torch headers unless text says so)."""
    (root / "cpu").mkdir(parents=True)
    for name in names:
        (root / "cpu" / f"{name}.cpp").write_text(text.format(name=name))
    return root


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Points the extension at a fresh cache and a csrc/ of one tiny file, CPU only; returns that csrc/."""
    monkeypatch.setenv("TORCH_MEDLOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_MEDLOSS_NO_BUILD", raising=False)
    monkeypatch.setattr(_extension, "_cuda_wanted", lambda: "built without CUDA: not in this test")
    root = tiny_csrc(tmp_path / "csrc", "tiny_kernel")
    monkeypatch.setattr(_extension, "source_dir", lambda: root)
    return root


def test_importing_builds_nothing_and_no_build_is_a_reason():
    script = textwrap.dedent("""
        import torch_medloss
        from torch_medloss import _extension
        assert _extension._outcome is None, "importing torch_medloss built or loaded the extension"
        print(_extension.why_not_loaded(cuda=False))
    """)
    env = {**os.environ, "TORCH_MEDLOSS_NO_BUILD": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TORCH_MEDLOSS_NO_BUILD=1 is set, so the C++/CUDA extension is not built or loaded"
    assert "torch_medloss: " not in result.stderr


def test_a_first_build_says_so_before_and_after_and_the_next_process_loads_it(tiny, tmp_path, capfd):
    outcome, directory = _extension._load(verbose=False)
    assert outcome.cpu_reason is None and outcome.origin == "built", outcome
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("torch_medloss: ")]
    assert len(lines) == 2, err
    assert lines[0].startswith("torch_medloss: building the C++ kernels for this torch, once, about "), lines
    assert lines[0].endswith(" s; python -m torch_medloss build does it ahead of time"), lines
    assert lines[1].startswith("torch_medloss: built the C++ kernels in ") and str(directory) in lines[1], lines
    assert directory.parent == tmp_path / "cache" and (directory / "built.ok").is_file()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["sources"] == ["cpu/tiny_kernel.cpp"] and manifest["variant"] == "cpu"

    again, same = _extension._load(verbose=False)
    assert (again.origin, again.path, same) == ("cache", outcome.path, directory)
    assert capfd.readouterr().err == "", "loading a finished entry must be silent"


def test_the_announced_time_is_the_last_build_of_this_cache(tiny, capfd):
    outcome, directory = _extension._load(verbose=False)
    assert outcome.origin == "built"
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["seconds"], manifest["cores"] = 321.0, os.cpu_count()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (tiny / "cpu" / "tiny_kernel.cpp").write_text(TINY.format(name="changed"))  # a new entry: builds again
    capfd.readouterr()
    assert _extension._load(verbose=False)[0].origin == "built"
    assert "once, about 321 s;" in capfd.readouterr().err


def test_the_build_command_shows_a_line_per_file(tiny, capfd):
    tiny_csrc(tiny.parent / "two", "first_kernel", "second_kernel")
    shutil.rmtree(tiny / "cpu")
    shutil.copytree(tiny.parent / "two" / "cpu", tiny / "cpu")
    outcome, _ = _extension._load(verbose=False, progress=True)
    assert outcome.origin == "built"
    err = capfd.readouterr().err
    progress = sorted(line.split(" (")[0] for line in err.splitlines() if line.startswith("torch_medloss: ["))
    assert progress == ["torch_medloss: [1/2] first_kernel.cpp", "torch_medloss: [2/2] second_kernel.cpp"] or \
        progress == ["torch_medloss: [1/2] second_kernel.cpp", "torch_medloss: [2/2] first_kernel.cpp"], err


def test_a_failed_build_says_why_and_where_the_full_log_is(tiny, tmp_path, capfd):
    (tiny / "cpu" / "tiny_kernel.cpp").write_text('#error "deliberately broken"\n')
    outcome, _ = _extension._load(verbose=False)
    entry = next((tmp_path / "cache").iterdir())
    log = entry / "build.log"
    assert outcome.path is None and outcome.origin is None
    assert outcome.cpu_reason.startswith(f"compiling {entry} failed (full log: {log}):"), outcome.cpu_reason
    assert "deliberately broken" in outcome.cpu_reason and "deliberately broken" in log.read_text()
    assert not (entry / "built.ok").exists()
    err = capfd.readouterr().err
    failed = [line for line in err.splitlines() if "failed after" in line]
    assert len(failed) == 1 and "deliberately broken" in failed[0] and failed[0].endswith(f"the full log is {log}")


def test_a_missing_compiler_is_the_reason(tiny, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    outcome, _ = _extension._load(verbose=False)
    assert outcome.cpu_reason == "no C++ compiler found ('/nonexistent/c++' is not on PATH; install one or set CXX)"
    assert outcome.cuda_reason == outcome.cpu_reason and outcome.path is None


def test_a_finished_entry_loads_without_a_toolchain(tiny, monkeypatch):
    assert _extension._load(verbose=False)[0].origin == "built"
    monkeypatch.setattr(_extension, "_toolchain", lambda: "no compiler on this node")
    outcome, _ = _extension._load(verbose=False)
    assert outcome.cpu_reason is None and outcome.origin == "cache"


def test_the_entry_name_ignores_where_csrc_is_but_not_what_it_holds(tmp_path):
    first = tiny_csrc(tmp_path / "a" / "csrc", "tiny_kernel")
    second = tiny_csrc(tmp_path / "b" / "csrc", "tiny_kernel")
    (second / "cpu" / "tiny.h").write_text("// a header\n")
    name = _extension._entry_name(first, _extension._sources(first, False), False)
    assert name.startswith(f"{_extension.torch.__version__}-cpu-")
    (first / "cpu" / "tiny.h").write_text("// a header\n")
    assert _extension._entry_name(first, _extension._sources(first, False), False) == \
        _extension._entry_name(second, _extension._sources(second, False), False) != name


def test_the_instruction_set_files_are_compiled_on_x86_only(tmp_path, monkeypatch):
    root = tiny_csrc(tmp_path / "csrc", "op_kernel", "op_isa_baseline", "op_isa_avx2", "op_isa_avx512")
    names = lambda: [path.name for path in _extension._sources(root, False)]  # noqa: E731
    monkeypatch.setattr(_extension.platform, "machine", lambda: "x86_64")
    assert names() == ["op_isa_avx2.cpp", "op_isa_avx512.cpp", "op_isa_baseline.cpp", "op_kernel.cpp"]
    monkeypatch.setattr(_extension.platform, "machine", lambda: "aarch64")
    assert names() == ["op_isa_baseline.cpp", "op_kernel.cpp"]


def test_the_longest_compiles_start_first(tmp_path):
    root = tiny_csrc(tmp_path / "csrc", "small_kernel", "big_isa_avx2")
    (root / "cpu" / "big_tiles_impl.h").write_text("// " + "x" * 5000 + "\n")
    (root / "cpu" / "big_isa_avx2.cpp").write_text('#include "big_tiles_impl.h"\n')
    order = [path.name for path in _extension._build_order(_extension._sources(root, False))]
    assert order == ["big_isa_avx2.cpp", "small_kernel.cpp"]


# ------------------------------------------------------------------------------------- concurrent first uses

_FIRST_USE = """
import json, sys, time
from pathlib import Path
from torch_medloss import _extension

root, barrier, index = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
_extension.source_dir = lambda: root
_extension._cuda_wanted = lambda: "built without CUDA: not in this test"
# The builder holds the lock two seconds longer than the tiny build takes, so that on a loaded box the others
# surely reach the lock while it is held (a slow toolchain probe could otherwise let them find the build finished).
_build = _extension._build


def _slow_build(*args, **kwargs):
    time.sleep(2)
    return _build(*args, **kwargs)


_extension._build = _slow_build
(barrier / f"ready-{index}").touch()
deadline = time.time() + 300
while not (barrier / "go").exists() and time.time() < deadline:
    time.sleep(0.01)
report = _extension.build(progress=False)
print(json.dumps({"origin": report["origin"], "cpu": report["cpu"], "reason": report["cpu_reason"]}))
"""


def test_concurrent_first_uses_build_once_and_all_load(tmp_path):
    # The processes wait at a barrier with torch imported, then start together: the one build (held 2 s longer than
    # ninja, the compiler and the link take) outlasts the time the others need to reach the lock.
    root = tiny_csrc(tmp_path / "csrc", "tiny_kernel")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "TORCH_MEDLOSS_CACHE": str(tmp_path / "cache")}
    env.pop("TORCH_MEDLOSS_NO_BUILD", None)
    processes = [
        subprocess.Popen([sys.executable, "-c", _FIRST_USE, str(root), str(barrier), str(index)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(4)
    ]
    deadline = time.time() + 300
    while len(list(barrier.glob("ready-*"))) < len(processes) and time.time() < deadline:
        time.sleep(0.05)
    (barrier / "go").touch()
    results = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), results
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert all(report["cpu"] for report in reports), reports
    assert sorted(report["origin"] for report in reports) == ["built", "cache", "cache", "cache"], reports
    errs = [err for _, err in results]
    assert sum("torch_medloss: building the C++ kernels" in err for err in errs) == 1, errs
    assert any("waiting for another process that is building" in err for err in errs), errs
    entry = next(path for path in (tmp_path / "cache").iterdir() if path.is_dir())
    log = (entry / ".ninja_log").read_text().splitlines()[1:]  # after the version line: start, end, mtime, target
    compiled = [line for line in log if line.split("\t")[3] == "tiny_kernel.o"]
    assert len(compiled) == 1, compiled


# ------------------------------------------------------------------------------------- never compile on a node


def _no_toolchain_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A compute node: no compiler and no ninja on PATH (python is called by its full path)."""
    bare = tmp_path / "bare-path"
    bare.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in ("TORCH_MEDLOSS_NO_BUILD", "CXX")}
    env.update(PATH=str(bare), **extra)
    return env


_NODE_JOB = """
import json, torch, torch_medloss
from torch_medloss import _extension

x = torch.randn(2, 3, 8, 8, requires_grad=True)
y = torch.randint(0, 3, (2, 1, 8, 8))
report = _extension.build(progress=False)
loss = torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, backend="cpp")(x, y) if report["cpu"] else None
if loss is not None:
    loss.backward()
print(json.dumps({"origin": report["origin"], "cpu": report["cpu"], "reason": report["cpu_reason"],
                  "package": torch_medloss.__file__, "loss": None if loss is None else loss.item()}))
"""


def _run_node_job(env: dict[str, str], cwd: Path) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", _NODE_JOB], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def built_cache() -> Path:
    """The cache the session's C++ tests use, with the extension in it: ``python -m torch_medloss build`` builds it
    (once; later runs load it)."""
    env = {key: value for key, value in os.environ.items() if key != "TORCH_MEDLOSS_NO_BUILD"}
    result = subprocess.run([sys.executable, "-m", "torch_medloss", "build"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0 and "  cpu: yes" in result.stdout, result.stdout + result.stderr
    return _extension.cache_dir()


def test_a_shared_cache_prepared_by_the_build_command_serves_a_node_without_a_compiler(built_cache, tmp_path):
    report, err = _run_node_job(_no_toolchain_env(tmp_path, TORCH_MEDLOSS_CACHE=str(built_cache)), REPO)
    assert report["cpu"] and report["origin"] == "cache", report
    assert report["loss"] is not None and 0.0 < report["loss"] < 1.0, report
    assert "building" not in err, err


def _project_copy(destination: Path) -> Path:
    """The files a wheel is built from (a copy: pip writes build/ and egg-info/ into the project it builds)."""
    destination.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "_prebuilt", "build")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    for name in ("torch_medloss", "kernels", "csrc"):
        shutil.copytree(REPO / name, destination / name, ignore=ignore)
    return destination


def test_a_wheel_built_with_the_switch_carries_the_library_and_loads_it_without_a_compiler(built_cache, tmp_path):
    pytest.importorskip("setuptools", reason="pip wheel --no-build-isolation needs setuptools installed")
    project = _project_copy(tmp_path / "project")
    dist = tmp_path / "dist"
    env = {key: value for key, value in os.environ.items() if key != "TORCH_MEDLOSS_NO_BUILD"}
    env.update(TORCH_MEDLOSS_PREBUILT="1", TORCH_MEDLOSS_CACHE=str(built_cache))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                             "-w", str(dist), str(project)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = dist.glob("torch_medloss-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), f"a compiled library in a pure wheel: {wheel.name}"
    with zipfile.ZipFile(wheel) as archive:
        prebuilt = [name for name in archive.namelist() if name.startswith("torch_medloss/_prebuilt/")]
    assert any(name.endswith("/built.ok") for name in prebuilt) and any(name.endswith(".so") for name in prebuilt), \
        prebuilt

    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                             str(wheel)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    empty_cache = tmp_path / "empty-cache"
    node = _no_toolchain_env(tmp_path, PYTHONPATH=str(site), TORCH_MEDLOSS_CACHE=str(empty_cache))
    report, err = _run_node_job(node, tmp_path)
    assert Path(report["package"]).is_relative_to(site), report
    assert report["cpu"] and report["origin"] == "wheel", report
    assert report["loss"] is not None and "building" not in err, (report, err)
    assert not empty_cache.exists() or not any(empty_cache.iterdir()), "loading from the wheel wrote to the cache"

    # Another torch (here: the entry renamed as if built for one): the wheel's library is not used, and the node
    # falls back to building, which it cannot do without a compiler.
    (entry,) = (site / "torch_medloss" / "_prebuilt").iterdir()
    entry.rename(entry.with_name("0.0.0" + entry.name[entry.name.index("-"):]))
    report, _ = _run_node_job(node, tmp_path)
    assert not report["cpu"] and report["origin"] is None, report
    assert report["reason"] in ("ninja is not installed (pip install ninja)",
                                "no C++ compiler found ('c++' is not on PATH; install one or set CXX)"), report
