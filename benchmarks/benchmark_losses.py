"""Forward+backward time of the losses per backend, against the reference and MONAI: a thin wrapper over
``python -m torch_medloss bench`` (torch_medloss/bench), kept for benchmarks/gpu_check.sh and old command lines.

    python benchmarks/benchmark_losses.py [--shape 2,4,48,48,48] [--dtype float32] [--losses Dice,DBCE] [--json PATH]
        [--backends triton,cuda,cpp,reference,compiled,monai]

Unlike the full command, the default here leaves out torch.compile and nnU-Net (--backends adds them), so one shape
fits gpu_check.sh's per-shape timeout. "auto" in --backends is accepted and dropped: it is one of the fused backends.
Every other flag of the command (--quick, --plot, ...) passes through.
"""

from __future__ import annotations

import argparse
import sys

from torch_medloss.__main__ import main as torch_medloss_main

DEFAULT_BACKENDS = "fused,reference,monai"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--backends", default=DEFAULT_BACKENDS)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if any(flag in rest for flag in ("-h", "--help")):
        print(__doc__)
    providers = [name for name in known.backends.split(",") if name.strip() and name.strip() != "auto"]
    return torch_medloss_main(["bench", "--providers", ",".join(providers) or "fused", *rest])


if __name__ == "__main__":
    raise SystemExit(main())
