"""The pieces of ``python -m torch_medloss bench``: workload selection and flag parsing, the "not available"
reasons, the table and JSON writers (from synthetic results), and one tiny real run on CPU. No timing is asserted."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from torch_medloss.__main__ import main
from torch_medloss.bench import providers, report, runner, workloads
from torch_medloss.bench.workloads import Workload

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


# ----------------------------------------------------------------------------------------------------------- workloads
def test_default_workloads_gpu_are_the_baselines():
    labels = [w.label for w in workloads.select_workloads(CUDA)]
    assert labels == ["3D fp32 B2 C4 128^3", "3D bf16 B2 C4 128^3", "2D fp32 B16 C4 512^2",
                      "3D fp32 B2 C14 96^3"]


def test_default_workloads_cpu_are_scaled_down():
    assert [w.label for w in workloads.select_workloads(CPU)] == ["3D fp32 B2 C4 48^3"]
    quick = workloads.select_workloads(CPU, quick=True)
    assert all(w.floor_bytes() < workloads.CPU_DEFAULT[0].floor_bytes() for w in quick)


def test_shape_and_dtype_selection():
    shape = workloads.parse_shape("1, 3, 5, 6, 7")
    assert shape == (1, 3, 5, 6, 7)
    assert workloads.select_workloads(CPU, shapes=[shape]) == [Workload(shape, "float32")]
    both = workloads.select_workloads(CPU, shapes=[shape, (2, 2, 8, 8)], dtypes=["float32", "bfloat16"])
    assert [(w.shape, w.dtype) for w in both] == [(shape, "float32"), (shape, "bfloat16"),
                                                  ((2, 2, 8, 8), "float32"), ((2, 2, 8, 8), "bfloat16")]
    dtype_only = workloads.select_workloads(CPU, dtypes=["bfloat16"])
    assert [w.shape for w in dtype_only] == [w.shape for w in workloads.CPU_DEFAULT]
    assert {w.dtype for w in dtype_only} == {"bfloat16"}
    assert Workload((1, 3, 5, 6, 7)).label == "3D fp32 B1 C3 5x6x7"


def test_parsing_accepts_names_and_aliases():
    assert workloads.parse_dtypes("fp32,bf16,float16") == ["float32", "bfloat16", "float16"]
    assert workloads.parse_losses("Dice,PM Dice,dice+ce,focal,Dice+Focal,DBCE,balanced_ce") == list(workloads.LOSSES)
    assert workloads.parse_providers("fused,reference,monai") == ["fused", "eager", "monai"]
    assert workloads.expand_providers(["fused", "eager"], CPU) == ["cpp", "eager"]
    assert workloads.expand_providers(["fused"], CUDA) == ["triton", "cuda"]
    assert workloads.expand_providers(None, CPU) == ["cpp", "eager", "compiled", "monai", "nnunet"]


@pytest.mark.parametrize("parse, value, match", [
    (workloads.parse_shape, "2,x,8,8", "--shape must be B,C,"),
    (workloads.parse_shape, "2,4,8", "got '2,4,8'"),
    (workloads.parse_shape, "2,1,8,8", "C >= 2"),
    (workloads.parse_shape, "2,4,0,8", "positive"),
    (workloads.parse_dtypes, "float64", "--dtype must be .*float32, bfloat16, float16.*got 'float64'"),
    (workloads.parse_losses, "Dice,Jaccard", "--losses must be .*dice, pm_dice.*got 'Jaccard'"),
    (workloads.parse_providers, "eager,keras", "--providers must be .*got 'keras'"),
])
def test_bad_values_give_a_clear_error(parse, value, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse(value)


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--shape", "2,4,8"])
    assert info.value.code == 2
    assert "--shape must be B,C," in capsys.readouterr().err


def test_build_command_still_parses():
    from torch_medloss.__main__ import _parser

    args = _parser().parse_args(["build", "--verbose"])
    assert args.command == "build" and args.verbose


def test_floor_bytes_formula():
    w = Workload((2, 4, 128, 128, 128))
    logits = 2 * 4 * 128**3 * 4
    assert w.floor_bytes() == 3 * logits + 2 * (2 * 128**3 * 8)
    # BASELINES.md: 89.5 us at 3.0 TB/s for this workload.
    assert w.floor_bytes() / 3.0e12 * 1e6 == pytest.approx(89.5, abs=0.1)


# -------------------------------------------------------------------------------------------------- reasons / providers
@pytest.mark.parametrize("provider, loss, device, quick, status, match", [
    ("triton", "dice", CPU, False, "unavailable", "Triton kernels need CUDA tensors"),
    ("cuda", "dice", CPU, False, "unavailable", "the CUDA backend runs on CUDA tensors"),
    ("cpp", "dice", CUDA, False, "unavailable", "the C\\+\\+ backend runs on CPU tensors"),
    ("monai", "dbce", CPU, False, "unavailable", "no MONAI equivalent"),
    ("monai", "pm_dice", CPU, False, "unavailable", "no MONAI equivalent"),
    ("compiled", "dice", CPU, True, "skipped", "skipped under --quick on CPU"),
])
def test_unavailable_reasons(provider, loss, device, quick, status, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as for a user: Triton on CPU tensors is refused
    with pytest.raises(providers.Unavailable, match=match) as info:
        providers.build(provider, loss, device, quick)
    assert info.value.status == status


def test_missing_packages_are_reported(monkeypatch):
    real = providers.importlib.util.find_spec
    monkeypatch.setattr(providers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("monai", "nnunetv2") else real(name, *a))
    with pytest.raises(providers.Unavailable, match="^MONAI not installed$"):
        providers.build("monai", "dice", CPU)
    with pytest.raises(providers.Unavailable, match="^nnunetv2 not installed$"):
        providers.build("nnunet", "dice", CPU)


def test_failures_become_rows():
    w = Workload((1, 2, 4, 4))
    logits, labels = w.make_inputs(CPU)
    result = runner.run_cell(w, "dice", "eager", logits, labels[:, :, :2], runner.Timing.quick(), True, None)
    assert result.status == "failed" and result.note.startswith("failed: ") and result.ms is None


# ------------------------------------------------------------------------------------------------------ table and JSON
def _synthetic(gpu: bool):
    w = Workload((2, 4, 8, 8, 8))
    common = dict(workload=w.label, shape=list(w.shape), dtype=w.dtype, loss="Dice")
    rows = [
        runner.Result(**common, provider="triton" if gpu else "cpp", implementation="fused", status="ok", ms=0.5,
                      peak_extra_mib=12.0 if gpu else None, floor_fraction=0.25 if gpu else None, host_ops=1,
                      host_launches=3),
        runner.Result(**common, provider="eager", implementation="reference eager", status="ok", ms=2.0,
                      peak_extra_mib=48.0 if gpu else None, floor_fraction=0.0625 if gpu else None),
        runner.Result(**common, provider="compiled", implementation="reference compiled", status="failed",
                      note="compile failed: boom"),
        runner.Result(**common, provider="monai", implementation="MONAI", status="unavailable",
                      note="MONAI not installed"),
    ]
    runner.add_speedups(rows)
    env = {"device": "cuda" if gpu else "cpu", "device_name": "Test card", "cpu": "Test CPU", "threads": 2,
           "date": "2026-01-01 00:00 UTC", "python": "3", "torch": "2.x", "cuda": None, "triton": "3.6.0",
           "monai": None, "nnunetv2": None, "torch_medloss": "0.1.0", "timing": "test"}
    measured = {"copy_bandwidth_bytes_per_s": 3e12 if gpu else None,
                "floor_ms": {w.label: w.floor_bytes() / 3e12 * 1e3 if gpu else None}}
    return rows, env, measured, [w]


def test_speedups():
    rows, *_ = _synthetic(gpu=False)
    assert rows[0].speedup == {"eager": 4.0, "compiled": None, "monai": None}
    assert rows[1].speedup["eager"] == 1.0
    assert rows[2].speedup == {"eager": None, "compiled": None, "monai": None}


def test_cpu_table_says_what_was_not_measured():
    rows, env, measured, _ = _synthetic(gpu=False)
    text = report.markdown(rows, env, measured)
    assert "### 3D fp32 B2 C4 8^3" in text
    assert "| Dice | fused | 0.500 | 4.00x | - | - | 1 + 3 | not measured on CPU |  |" in text
    assert "compile failed: boom" in text and "MONAI not installed" in text
    assert "of floor" not in text and "Test card" in text


def test_gpu_table_has_memory_and_floor():
    rows, env, measured, _ = _synthetic(gpu=True)
    text = report.markdown(rows, env, measured)
    assert "3.00 TB/s" in text and "(floor " in text
    assert "| Dice | fused | 0.500 | 4.00x | - | - | 1 + 3 | 12 | 25% |  |" in text


def test_json_has_every_figure(tmp_path):
    rows, env, measured, ws = _synthetic(gpu=True)
    path = tmp_path / "out.json"
    report.write_json(str(path), rows, env, measured, ws)
    data = json.loads(path.read_text())
    assert data["environment"]["device_name"] == "Test card" and data["environment"]["triton"] == "3.6.0"
    assert data["copy_bandwidth_bytes_per_s"] == 3e12
    assert data["workloads"][0]["shape"] == [2, 4, 8, 8, 8] and data["workloads"][0]["dtype"] == "float32"
    first = data["results"][0]
    assert first["ms"] == 0.5 and first["peak_extra_mib"] == 12.0 and first["speedup"]["eager"] == 4.0
    assert data["results"][3]["note"] == "MONAI not installed"


def test_plot_flag_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(report, "plot_available", lambda: "matplotlib is not installed")
    code = main(["bench", "--device", "cpu", "--shape", "1,2,4,4", "--losses", "dice", "--providers", "eager",
                 "--quick", "--no-progress", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")])
    assert code == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (tmp_path / "r.json").exists() and not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------------------------------- tiny real run
def test_tiny_run_on_cpu(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--quick", "--shape", "1,3,6,5,4", "--losses", "dice,dbce",
                 "--providers", "cpp,eager,monai", "--json", str(path)])
    assert code == 0
    out, err = capsys.readouterr()
    assert "### 3D fp32 B1 C3 6x5x4" in out and "reference eager" in out and "no MONAI equivalent" in out
    assert "[1/6]" in err or "%" in err  # the progress (line counter or tqdm)
    data = json.loads(path.read_text())
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"] == torch.__version__
    by_cell = {(r["loss"], r["provider"]): r for r in data["results"]}
    assert len(by_cell) == 6
    eager = by_cell[("Dice", "eager")]
    assert eager["status"] == "ok" and eager["ms"] > 0 and eager["peak_extra_mib"] is None
    assert eager["host_launches"] == 0 and eager["host_ops"] > 10  # the reference: many small PyTorch ops
    cpp = by_cell[("DBCE (R=3, ball)", "cpp")]
    assert (cpp["status"] == "ok" and cpp["ms"] > 0) or (cpp["status"] == "unavailable" and cpp["note"])
    if cpp["status"] == "ok":  # one fused op forward, one backward, plus the CPU label check and autograd's ones
        assert cpp["host_launches"] == 2 and cpp["host_ops"] <= 4
    assert "host ops + launches" in out


# ----------------------------------------------------------------------------------------------------- bench --ops
def test_ops_gpu_shapes_are_the_baselines():
    from torch_medloss.bench import ops

    assert [n.label for n in ops.GPU_NODES] == ["B16 128x128, 2 x 64 ch -> 64", "B16 128x128, 3 x 64 ch -> 64",
                                                 "B8 256x256, 4 x 32 ch -> 64"]
    assert ops.GPU_NODES[0].forward_flops() == 2 * 16 * 128 * 128 * 64 * 128 * 9
    assert ops.GPU_IMAGES == ((16, 1, 512, 512), (16, 3, 512, 512))


def test_cat_conv_copy_matches_the_fused_network():
    from torch_medloss.bench import ops
    from torch_medloss.models import LatticeFusionNet
    from torch_medloss.nn import ConcatConv2d

    torch.manual_seed(0)
    model = LatticeFusionNet().double()
    baseline = ops.cat_conv_copy(model)
    assert any(isinstance(m, ConcatConv2d) for m in model.modules())
    assert not any(isinstance(m, ConcatConv2d) for m in baseline.modules())
    x = torch.rand(1, 1, 12, 13, dtype=torch.float64)
    torch.testing.assert_close(baseline(x), model(x))


def test_ops_tiny_run_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as for a user: the Triton rows are unavailable on CPU
    path = tmp_path / "ops.json"
    assert main(["bench", "--ops", "--quick", "--no-progress", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "### concat_conv2d node" in text and "### LFN training step" in text and "### frequency_split" in text
    rows = json.loads(path.read_text())["rows"]
    by_impl = {(r["op"], r["implementation"], r["pass_"]): r for r in rows}
    cat = by_impl[("concat_conv2d node", "torch.cat + conv2d", "forward+backward")]
    assert cat["status"] == "ok" and cat["ms"] > 0 and cat["speedup"] == pytest.approx(1.0)
    triton_row = by_impl[("concat_conv2d node", "concat_conv2d (triton)", "forward")]
    assert triton_row["status"] == "unavailable" and "CUDA" in triton_row["note"]
    assert by_impl[("LFN training step", "same network on torch.cat + nn.Conv2d", "forward+backward+Adam")]["ms"] > 0
    assert by_impl[("frequency_split", "reference (pad + 2 conv2d + subtract)", "forward")]["status"] == "ok"
