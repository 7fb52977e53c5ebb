"""nnU-Net's whole pipeline with a torch_medloss trainer on a tiny synthetic dataset, on the CPU (run by
test_nnunet.py::test_smoke_training; not collected by pytest).

Usage: python nnunet_smoke_run.py WORK_DIR   (the re-export module must be installed: python -m torch_medloss nnunet
install). Writes nnUNet_raw/preprocessed/results under WORK_DIR; prints a JSON summary as its last line.

Steps: four 16^3 volumes (spacing 2 x 1 x 1 mm) with a cube and a smaller cube as labels 1 and 2; nnU-Net's
fingerprint, planning and 3d_fullres preprocessing; nnUNetTrainerPMDice_1epochs found by name as nnUNetv2_train does
(fold "all", 2 training and 1 validation iteration instead of 250 and 50, single-threaded augmentation); nnU-Net's
final validation; then the nnUNetv2_predict command with -tr nnUNetTrainerPMDice_1epochs on one new volume.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

DATASET_ID, DATASET = 901, "Dataset901_TorchMedlossSmoke"
TRAINER = "nnUNetTrainerPMDice_1epochs"


def write_case(folder: Path, name: str, seed: int, with_label: bool) -> None:
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    labels = np.zeros((16, 16, 16), np.uint8)
    z, y, x = rng.integers(4, 12, 3)
    labels[z - 3:z + 3, y - 3:y + 3, x - 3:x + 3] = 1
    z, y, x = rng.integers(3, 13, 3)
    labels[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 2
    image = labels.astype(np.float32) + rng.normal(0, 0.3, labels.shape).astype(np.float32)
    items = [(image, folder / "imagesTr" / f"{name}_0000.nii.gz")]
    if with_label:
        items.append((labels, folder / "labelsTr" / f"{name}.nii.gz"))
    for array, path in items:
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((1.0, 1.0, 2.0))  # x, y, z in mm
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(path))


def main(work: Path) -> dict:
    raw = work / "raw" / DATASET
    for i in range(4):
        write_case(raw, f"case{i}", i, with_label=True)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "big": 1, "small": 2}, "numTraining": 4,
        "file_ending": ".nii.gz"}))
    write_case(work / "test", "case0", 10, with_label=False)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.run.run_training import get_trainer_from_args

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,))

    os.environ["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation (planning above needs it unset)
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", "all", TRAINER, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 1
    trainer.run_training()
    trainer.perform_actual_validation()
    summary = json.loads((Path(trainer.output_folder) / "validation" / "summary.json").read_text())

    predict = Path(sys.executable).with_name("nnUNetv2_predict")
    subprocess.run([str(predict), "-i", str(work / "test" / "imagesTr"), "-o", str(work / "predicted"),
                    "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "all", "-tr", TRAINER, "-device", "cpu",
                    "-npp", "1", "-nps", "1", "--disable_progress_bar"], check=True)
    return {"trainer": f"{type(trainer).__module__}.{type(trainer).__qualname__}",
            "validation_mean_dice": summary["foreground_mean"]["Dice"],
            "checkpoint": (Path(trainer.output_folder) / "checkpoint_final.pth").exists(),
            "predicted": sorted(p.name for p in (work / "predicted").glob("*.nii.gz"))}


if __name__ == "__main__":
    work_dir = Path(sys.argv[1]).resolve()
    for name, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[name] = str(work_dir / folder)
    print(json.dumps(main(work_dir)))
