"""Shared test helpers: value-and-gradient comparison under one upstream gradient; Triton kernel scripts run under
the interpreter in a fresh process."""

import atexit
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch


def value_and_grad(loss_fn, input, target, upstream=None, scale=1.0):
    """Loss value and d(scale * <upstream, loss>)/d(input) for a fresh leaf copy of ``input``."""
    leaf = input.detach().clone().requires_grad_(True)
    value = loss_fn(leaf, target)
    weighted = scale * (value * upstream).sum() if upstream is not None else scale * value.sum()
    (grad,) = torch.autograd.grad(weighted, leaf, allow_unused=True)
    return value.detach(), (torch.zeros_like(leaf) if grad is None else grad)


def assert_same_loss(ours, theirs, input, target, rtol, atol, upstream_seed=1):
    """Same value, shape and gradient (under a random upstream gradient, and with the loss scaled by 2)."""
    ref_value, _ = value_and_grad(theirs, input, target)
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(ref_value.shape, generator=generator, dtype=torch.float64).to(ref_value.dtype)
    for scale in (1.0, 2.0):
        expected, expected_grad = value_and_grad(theirs, input, target, upstream, scale)
        value, grad = value_and_grad(ours, input, target, upstream, scale)
        assert value.shape == expected.shape, f"shape {tuple(value.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ Triton kernels under the interpreter
# TRITON_INTERPRET=1 must be set before triton is imported, and setting it in the test process would change how
# every later test module sees triton, so the interpreted tests run scripts in a fresh interpreter: SCRIPT_HEADER, a
# test file's PRELUDE (its imports, case builders and comparisons), then the test's body and ``finish()``. Each script
# runs many cases (one start-up costs seconds) and collects every mismatch in FAILURES before failing.
SCRIPT_HEADER = '''
import importlib, importlib.util, sys
from pathlib import Path

import torch

import torch_medloss


def load_kernel(name):
    """torch_medloss.kernels.<name>: from the installed package, else from this checkout's kernels/ mounted as
    torch_medloss.kernels (setup.py maps that directory; a bare checkout lacks it). A module already loaded is
    reused: a second load would register its ops again."""
    if importlib.util.find_spec("torch_medloss.kernels") is None:
        spec = importlib.util.spec_from_file_location(
            "torch_medloss.kernels", Path(REPO) / "kernels" / "__init__.py",
            submodule_search_locations=[str(Path(REPO) / "kernels")],
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
        torch_medloss.kernels = package
    return importlib.import_module(f"torch_medloss.kernels.{name}")


FAILURES = []


def ptxas_report(fn, pointer_types, constants, num_warps, num_stages=None, float_args=()):
    """Compile the @triton.jit ``fn`` ahead of time for an H100 (sm_90a) without a GPU and run ``ptxas -v``:
    returns (registers, spill store bytes) or records a failure. Arguments named ``*_ptr`` take the type in
    ``pointer_types`` (default ``*fp32``), those in ``constants`` are constexprs, those in ``float_args`` fp32 and
    the rest i32; ``num_stages`` None keeps Triton's default. Run it without TRITON_INTERPRET
    (run_script(..., interpret=False))."""
    import re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    options = backend.parse_options(options)
    # Triton's own compile runs ptxas -v (its make_cubin) and prints that report with dump_ptxas_log: read it there
    # rather than running ptxas a second time. A compile served from Triton's cache runs no ptxas: then run it here.
    import contextlib, io
    log = io.StringIO()
    dump = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = dump
    stderr, returncode = log.getvalue(), 0
    if "registers" not in stderr:
        with tempfile.TemporaryDirectory() as folder:
            ptx = Path(folder) / "kernel.ptx"
            ptx.write_text(compiled.asm["ptx"])
            report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                                     str(Path(folder) / "kernel.cubin")], capture_output=True, text=True)
        stderr, returncode = report.stderr, report.returncode
    registers = [int(n) for n in re.findall(r"Used (\\d+) registers", stderr)]
    spills = [int(n) for n in re.findall(r"(\\d+) bytes spill stores", stderr)]
    if returncode != 0 or not registers:
        FAILURES.append(f"ptxas failed for {fn.__name__}: {stderr}")
        return None, None
    return max(registers), max(spills, default=0)


def finish():
    if FAILURES:
        print(f"{len(FAILURES)} failure(s):")
        print("\\n".join(FAILURES))
        sys.exit(1)
'''

_REPO = Path(__file__).resolve().parent.parent


def run_script(prelude: str, body: str, interpret: bool = True) -> subprocess.CompletedProcess:
    """Run SCRIPT_HEADER + ``prelude`` + ``body`` + ``finish()`` in a fresh interpreter from the repository root,
    under TRITON_INTERPRET=1 (or compiled, with ``interpret=False``); assert that it exits 0, showing its output."""
    code = f"REPO = {str(_REPO)!r}\n" + SCRIPT_HEADER + prelude + textwrap.dedent(body) + "\nfinish()\n"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], cwd=_REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"
    return result


def exec_prelude(prelude: str) -> dict:
    """SCRIPT_HEADER + ``prelude`` run in this process (the CUDA tests): the kernel, helpers and FAILURES list."""
    namespace = {"REPO": str(_REPO)}
    exec(SCRIPT_HEADER + prelude, namespace)
    return namespace


# ------------------------------------------------------------------ ahead-of-time compiles: one subprocess for all ops
# Compiling a kernel for sm_90 (ptxas_report) needs triton imported without TRITON_INTERPRET (the interpreter replaces
# @triton.jit), so it cannot happen in the test process. Instead of one subprocess per op, every test module that
# has such a check registers its script at import (compile_check); one fresh interpreter (one start-up, one triton
# import) runs all the registered scripts, each in its own namespace with its own FAILURES, and writes each check's
# result as soon as it is done; compile_result waits for one check's. start_compile_checks starts that process in the
# background, so that it compiles while the interpreted tests run on the other core.
_COMPILE_CHECKS: dict[str, str] = {}
_COMPILE_RUNNER = '''
import contextlib, io, json, os, traceback

for NAME, BODY in CHECKS.items():
    FAILURES.clear()
    OUTPUT = io.StringIO()
    with contextlib.redirect_stdout(OUTPUT):
        try:
            exec(BODY, dict(globals()))
        except Exception:
            FAILURES.append(traceback.format_exc())
    partial = Path(RESULTS) / f"{NAME}.partial"
    partial.write_text(json.dumps({"output": OUTPUT.getvalue(), "failures": list(FAILURES)}))
    os.replace(partial, Path(RESULTS) / f"{NAME}.json")  # whole, or not there
'''


class _CompileRun:
    """The one subprocess that runs the registered compile checks, its log and its results (in a temporary folder)."""

    def __init__(self) -> None:
        self.names = sorted(_COMPILE_CHECKS)
        self.folder = tempfile.TemporaryDirectory()
        self.log_path = Path(self.folder.name) / "log.txt"
        checks = {name: _COMPILE_CHECKS[name] for name in self.names}
        code = (f"REPO = {str(_REPO)!r}\nRESULTS = {self.folder.name!r}\nCHECKS = {checks!r}\n" + SCRIPT_HEADER
                + _COMPILE_RUNNER)
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        with open(self.log_path, "w") as log:  # a file, not a pipe: nobody reads a pipe while the tests run
            self.process = subprocess.Popen([sys.executable, "-c", code], cwd=_REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        atexit.register(self.close)

    def result(self, name: str, timeout: float = 900.0) -> dict:
        path = Path(self.folder.name) / f"{name}.json"
        deadline = time.monotonic() + timeout
        while not path.exists() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert path.exists(), f"the compile check {name!r} gave no result:\n{self.log_path.read_text()[-6000:]}"
        return json.loads(path.read_text())

    def close(self) -> None:
        if self.process.poll() is None:  # the tests stopped before they needed it
            self.process.kill()
            self.process.wait()
        self.folder.cleanup()


_compile_run: _CompileRun | None = None


def compile_check(name: str, body: str) -> None:
    """Register the compile-only script ``body`` (SCRIPT_HEADER's load_kernel, ptxas_report and FAILURES in scope;
    what it prints is kept) as check ``name``. Call it at the import of the test module that asserts on it."""
    _COMPILE_CHECKS[name] = textwrap.dedent(body)


def start_compile_checks() -> None:
    """Start the subprocess that runs every registered compile check, unless it has started."""
    global _compile_run
    if _compile_run is None:
        _compile_run = _CompileRun()


def compile_result(name: str) -> tuple[str, list[str]]:
    """(what check ``name`` printed, its failures), from the one subprocess that runs every registered check
    (started here if start_compile_checks has not started it); waits for that check only."""
    global _compile_run
    start_compile_checks()
    if name not in _compile_run.names:  # registered after the run started: one more run, for everything registered
        _compile_run = _CompileRun()
    result = _compile_run.result(name)
    return result["output"], result["failures"]
