"""Arguments and entry point of ``python -m torch_medloss nnunet path|install|uninstall`` (see discovery.py)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Make nnU-Net v2 find torch_medloss's trainers (nnUNetTrainerDiceCE, nnUNetTrainerPMDice, nnUNetTrainerDBCE, "
    "nnUNetTrainerDiceDBCE and their _<N>epochs variants) for nnUNetv2_train and nnUNetv2_predict -tr. "
    "path: print the folder to put in nnUNet_extTrainer (nnunetv2 >= 2.8). install: write a re-export module into "
    "the installed nnunetv2's trainer folder (any version; also works where torchvision is broken). "
    "uninstall: remove that module."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["path", "install", "uninstall"],
                        help="path: print the nnUNet_extTrainer folder; install/uninstall: the module in nnunetv2")


def _error(message: str) -> int:
    print(f"torch_medloss nnunet: {message}", file=sys.stderr)
    return 1


def _trainer_list() -> str:
    from torch_medloss.nnunet import discovery

    epochs = ", ".join(str(n) for n in discovery.EPOCH_VARIANTS)
    return f"{', '.join(discovery.BASE_TRAINER_NAMES)} and each as <name>_<N>epochs (N = {epochs})"


def _path() -> int:
    from torch_medloss.nnunet import discovery

    version = discovery.nnunet_version()
    if version is None:
        return _error(str(discovery.NnunetNotInstalled()))
    if version < discovery.EXT_TRAINER_SINCE:
        return _error(f"nnunetv2 {version} does not read nnUNet_extTrainer (it came in "
                      f"{discovery.EXT_TRAINER_SINCE}); run `python -m torch_medloss nnunet install` instead.")
    print(discovery.external_folder())
    problem = discovery.torchvision_problem()
    if problem is not None:
        print(f"torch_medloss nnunet: warning: `import torchvision` fails here ({problem}). nnU-Net imports its own "
              "trainers (some need timm and torchvision) before it searches nnUNet_extTrainer, so the lookup will "
              "crash. Install the torchvision built for your torch (on a CPU-only machine: from PyTorch's CPU "
              "wheel index), or use `python -m torch_medloss nnunet install`, which avoids that import.",
              file=sys.stderr)
    return 0


def _install() -> int:
    from torch_medloss.nnunet import discovery

    try:
        path, written = discovery.install()
    except (discovery.NnunetNotInstalled, FileExistsError, PermissionError, RuntimeError) as exc:
        return _error(str(exc))
    version = discovery.nnunet_version()
    if written:
        print(f"torch_medloss nnunet: wrote {path} (nnunetv2 {version}).")
    else:
        print(f"torch_medloss nnunet: already installed: {path} (nnunetv2 {version}).")
    print(f"nnUNetv2_train and nnUNetv2_predict -tr now find {_trainer_list()}. "
          "Undo with `python -m torch_medloss nnunet uninstall`.")
    return 0


def _uninstall() -> int:
    from torch_medloss.nnunet import discovery

    try:
        path, removed = discovery.uninstall()
    except (discovery.NnunetNotInstalled, FileExistsError, PermissionError, RuntimeError) as exc:
        return _error(str(exc))
    print(f"torch_medloss nnunet: removed {path}." if removed else f"torch_medloss nnunet: nothing to remove: "
          f"{path} does not exist.")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"path": _path, "install": _install, "uninstall": _uninstall}[args.action]()
