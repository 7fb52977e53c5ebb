"""Look trainers up by name with nnU-Net's own function (run by test_nnunet.py in a fresh process; not collected).

Usage: python nnunet_lookup.py [--declare-torchvision-ops] STEP...
    find:NAME   recursive_find_trainer_class_by_name(NAME), as nnUNetv2_train and nnUNetv2_predict call it
    ext:PATH    set nnUNet_extTrainer=PATH (nnU-Net reads it at each lookup)
    uninstall   remove the module `python -m torch_medloss nnunet install` wrote

Prints one JSON line per step: the class found ("module.qualname") or the error, and first how torchvision's compiled
ops stand ("absent", "loaded", "declared" or "broken").

--declare-torchvision-ops: where torchvision's compiled library cannot load (PyPI's CUDA build beside a CPU-only
torch, as in CI), declare the two operator schemas that ``import torchvision`` registers fake kernels for, so that the
import, and with it timm and nnU-Net's Primus trainers, gets through. Nothing in the lookup calls a torchvision
operator; with a torchvision that loads, nothing is declared.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

_declared = []  # keeps the torch.library.Library alive for the whole process


def prepare_torchvision_ops(declare: bool) -> str:
    """"absent", "loaded" (its compiled library loads here), "declared" or "broken" (not loadable, not declared)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return "absent"
    for library in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
            return "loaded"
        except OSError:
            break
    if not declare:
        return "broken"
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(library)
    return "declared"


def run_step(step: str) -> dict:
    if step == "uninstall":
        from torch_medloss.nnunet import discovery

        return {"step": step, "removed": discovery.uninstall()[1]}
    if step.startswith("ext:"):
        os.environ["nnUNet_extTrainer"] = step[len("ext:"):]
        return {"step": step}
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        trainer = recursive_find_trainer_class_by_name(step[len("find:"):])
    except Exception as exc:  # noqa: BLE001 - the caller asserts on the error
        return {"step": step, "error": f"{type(exc).__name__}: {exc}"}
    return {"step": step, "class": f"{trainer.__module__}.{trainer.__qualname__}"}


def main(argv: list[str]) -> int:
    declare = "--declare-torchvision-ops" in argv
    print(json.dumps({"torchvision_ops": prepare_torchvision_ops(declare)}), flush=True)
    for step in (a for a in argv if a != "--declare-torchvision-ops"):
        print(json.dumps(run_step(step)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
