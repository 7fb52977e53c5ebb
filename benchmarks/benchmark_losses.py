"""Forward+backward time of the fused losses per backend, against the reference and MONAI, in one run.

    python benchmarks/benchmark_losses.py [--shape 2,4,48,48,48] [--dtype float32] [--losses Dice,DBCE] [--json PATH]

GPU: medians of ``triton.testing.do_bench`` (ms), peak extra memory above the inputs (MiB). CPU: medians of
``torch.utils.benchmark`` (no peak memory: a CPU figure would mean nothing). The main benchmark command with all
losses and baselines comes with the benchmark issue; this script is the fused losses' own.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from datetime import date

import torch

import torch_medloss

LOSSES = {
    "Dice": lambda backend: torch_medloss.DiceLoss(to_onehot_y=True, softmax=True, batch=True, backend=backend),
    "PM Dice": lambda backend: torch_medloss.PMDiceLoss(gamma=2.0, to_onehot_y=True, softmax=True, batch=True,
                                                        backend=backend),
    "Dice+CE": lambda backend: torch_medloss.DiceCELoss(to_onehot_y=True, softmax=True, batch=True, backend=backend),
    "DBCE": lambda backend: torch_medloss.DBCELoss(radius=3.0, element="ball", backend=backend),
    "Balanced CE": lambda backend: torch_medloss.BalancedCELoss(backend=backend),
}


def monai_loss(name: str):
    try:
        import monai.losses
    except ImportError:
        return None
    if name == "Dice":
        return monai.losses.DiceLoss(to_onehot_y=True, softmax=True, batch=True)
    if name == "Dice+CE":
        return monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    return None


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3


def peak_extra_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help="B,C,*S (default: 2,4,128,128,128 on GPU, 2,4,48,48,48 on CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", default="auto,triton,cuda,cpp,reference")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, from {', '.join(LOSSES)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(int(s) for s in (args.shape or ("2,4,128,128,128" if device.type == "cuda" else "2,4,48,48,48"))
                  .split(","))
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(shape, device=device, dtype=dtype).mul_(3).requires_grad_(True)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), device=device)
    rows = []
    for name in args.losses.split(","):
        make = LOSSES[name]
        candidates = [(backend, lambda b=backend, make=make: make(b)) for backend in args.backends.split(",")]
        candidates.append(("MONAI", lambda name=name: monai_loss(name)))
        for label, build in candidates:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss_fn = build()
                    if loss_fn is None:
                        rows.append({"loss": name, "impl": label, "ms": None, "note": "not available"})
                        continue

                    def step(loss_fn=loss_fn):
                        logits.grad = None
                        loss_fn(logits, labels).backward()

                    step()
                    ms = time_ms(step, device)
                    mib = peak_extra_mib(step, device)
            except (ValueError, RuntimeError) as exc:
                rows.append({"loss": name, "impl": label, "ms": None, "note": str(exc).splitlines()[0][:90]})
                continue
            rows.append({"loss": name, "impl": label, "ms": ms, "peak_extra_mib": mib})
    reference = {r["loss"]: r["ms"] for r in rows if r["impl"] == "reference" and r["ms"]}
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}, "
          f"{torch.get_num_threads()} threads) torch={torch.__version__} shape={shape} dtype={args.dtype} "
          f"date={date.today()}")
    print("| loss | implementation | fwd+bwd ms | vs reference | peak extra MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["ms"] is None:
            print(f"| {r['loss']} | {r['impl']} | - | - | {r['note']} |")
            continue
        speedup = reference.get(r["loss"], float("nan")) / r["ms"]
        mib = "not measured (CPU)" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"| {r['loss']} | {r['impl']} | {r['ms']:.2f} | {speedup:.2f}x | {mib} |")
    if args.json:
        meta = {"device": str(device), "torch": torch.__version__, "shape": shape, "dtype": args.dtype,
                "date": str(date.today()), "threads": torch.get_num_threads()}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
