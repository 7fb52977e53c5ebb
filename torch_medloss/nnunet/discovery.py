"""How nnU-Net finds torch_medloss's trainers by name (it has no entry points), without importing nnunetv2.

nnU-Net looks a trainer up (``recursive_find_trainer_class_by_name``, for training and prediction) by importing
the modules of its own ``nnunetv2/training/nnUNetTrainer/`` folder, modules before subpackages, and then, from
2.8.0 on, the folders listed in ``nnUNet_extTrainer``. Two routes follow:

* ``external_folder()``: a folder holding one uniquely named module that re-exports our trainers, for
  ``nnUNet_extTrainer``. nnU-Net reaches it only after importing every module of its own folder, some of which
  import timm and torchvision.
* ``install()``: the same re-export written into nnU-Net's trainer folder, where it is found among the modules,
  before any subpackage is imported; works on every version. ``uninstall()`` removes it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from pathlib import Path

from packaging.version import Version

MODULE_NAME = "torch_medloss_nnunet_trainers"
# nnUNet_extTrainer appeared in nnunetv2 2.8.0.
EXT_TRAINER_SINCE = Version("2.8.0")
BASE_TRAINER_NAMES = ("nnUNetTrainerDiceCE", "nnUNetTrainerPMDice", "nnUNetTrainerDBCE", "nnUNetTrainerDiceDBCE")
EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500)
INSTALL_HINT = "pip install 'torch_medloss[nnunet]' (keep your torch pinned in the same command)"

# What install() writes. nnU-Net imports every module of its trainer folder to look up any trainer that is not its
# own, so the module must not fail when torch_medloss is gone: it re-exports only while torch_medloss is importable.
INSTALLED_MODULE = (
    "# Written by `python -m torch_medloss nnunet install`; `python -m torch_medloss nnunet uninstall` removes it.\n"
    "import importlib.util\n"
    "\n"
    "if importlib.util.find_spec(\"torch_medloss\") is not None:\n"
    "    from torch_medloss.nnunet.trainers import *  # noqa: F403 - nnU-Net finds trainers by name here\n"
)


class NnunetNotInstalled(RuntimeError):
    """nnunetv2 cannot be found in this Python environment."""

    def __init__(self) -> None:
        super().__init__(f"nnunetv2 is not installed in this Python environment: {INSTALL_HINT}.")


def nnunet_version() -> Version | None:
    """The installed nnunetv2's version, or None when it is not installed."""
    if importlib.util.find_spec("nnunetv2") is None:
        return None
    try:
        return Version(importlib.metadata.version("nnunetv2"))
    except importlib.metadata.PackageNotFoundError:  # importable but not installed as a distribution (a checkout)
        return Version("0")


def trainer_folder() -> Path:
    """nnunetv2/training/nnUNetTrainer of the installed nnunetv2; NnunetNotInstalled when there is none."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise NnunetNotInstalled()
    folder = Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer"
    if not folder.is_dir():
        raise RuntimeError(f"nnunetv2 at {folder.parents[1]} has no training/nnUNetTrainer folder.")
    return folder


def external_folder() -> Path:
    """The folder for ``nnUNet_extTrainer``."""
    return Path(__file__).with_name("external")


def installed_module(folder: Path | None = None) -> Path:
    """Where install() writes its module."""
    return (folder if folder is not None else trainer_folder()) / f"{MODULE_NAME}.py"


def install(folder: Path | None = None) -> tuple[Path, bool]:
    """Write the re-export module into nnU-Net's trainer folder; returns (path, whether it was written now).

    Raises FileExistsError when a different file already has that name (never overwritten), PermissionError when
    the folder is not writable.
    """
    path = installed_module(folder)
    if path.exists():
        if path.read_text() == INSTALLED_MODULE:
            return path, False
        raise FileExistsError(f"{path} exists and was not written by this command; not overwritten.")
    path.write_text(INSTALLED_MODULE)
    return path, True


def uninstall(folder: Path | None = None) -> tuple[Path, bool]:
    """Remove the module install() wrote (and its bytecode); returns (path, whether it was there).

    Raises FileExistsError when a file of that name differs from what install() writes (it is left alone).
    """
    path = installed_module(folder)
    if not path.exists():
        return path, False
    if path.read_text() != INSTALLED_MODULE:
        raise FileExistsError(f"{path} was not written by `python -m torch_medloss nnunet install`; left in place.")
    path.unlink()
    for compiled in (path.parent / "__pycache__").glob(f"{MODULE_NAME}.*.pyc"):
        compiled.unlink()
    return path, True


def torchvision_problem() -> str | None:
    """Why ``import torchvision`` fails here, or None when it imports or is absent.

    nnunetv2 depends on timm, which imports torchvision; PyPI's torchvision is built for CUDA and fails to import
    beside a CPU-only torch ("operator torchvision::nms does not exist"). nnU-Net's lookup then crashes while it
    imports its own trainers, before it reaches ``nnUNet_extTrainer``.
    """
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure here breaks nnU-Net's lookup the same way
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    return None
