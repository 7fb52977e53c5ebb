"""Packaging for torch_medloss.

By default nothing here imports torch or compiles C++: the sources in csrc/ ship as package data and are built on
first use (or by ``python -m torch_medloss build``) with ``torch.utils.cpp_extension.load`` against the torch that
is already installed. That keeps ``pip install .`` from ever resolving a second torch inside an isolated build
environment.

Opt in with ``TORCH_MEDLOSS_PREBUILT=1`` to put the compiled extension in the wheel, for machines without a
compiler (the nodes of a cluster):

    TORCH_MEDLOSS_PREBUILT=1 pip wheel --no-build-isolation --no-deps .

builds it against the torch installed in this environment (hence no build isolation, which would bring its own
torch), with CUDA when this machine has a GPU and a CUDA toolkit (see torch_medloss/_extension.py), and adds it
under torch_medloss/_prebuilt/. Such a wheel is tagged for this Python and platform; installed next to the same
torch it loads the library without compiling, and next to any other torch it builds from its sources as usual.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

PREBUILT_ENV = "TORCH_MEDLOSS_PREBUILT"
PREBUILT = os.environ.get(PREBUILT_ENV, "0") not in ("", "0")
HERE = Path(__file__).resolve().parent


class BuildPyWithExtension(build_py):
    """build_py, then (with TORCH_MEDLOSS_PREBUILT=1) the compiled extension into the package being built."""

    def run(self):
        super().run()
        if not PREBUILT:
            return
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"{PREBUILT_ENV}=1 compiles against the installed torch, which this build environment "
                               "lacks: build with pip wheel --no-build-isolation") from exc
        # The module alone, not the package (whose __init__ imports much more): it needs only torch.
        path = HERE / "torch_medloss" / "_extension.py"
        spec = importlib.util.spec_from_file_location("_torch_medloss_extension", path)
        extension = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = extension  # its dataclass looks its module up while it is being defined
        spec.loader.exec_module(extension)
        for entry in extension.prebuild(Path(self.build_lib) / "torch_medloss" / "_prebuilt"):
            print(f"{PREBUILT_ENV}: added {entry.name} to the wheel")


class BinaryDistribution(Distribution):
    """A wheel that carries a compiled library is tagged for this Python and platform, not py3-none-any."""

    def has_ext_modules(self):
        return PREBUILT


setup(
    # Every torch_medloss.* package (models, bench, the study commands, ...) plus the two mapped directories.
    packages=[*find_packages(include=["torch_medloss", "torch_medloss.*"]), "torch_medloss.kernels",
              "torch_medloss.csrc"],
    # kernels/ and csrc/ live at the top of the repository (the project layout) but are installed inside the
    # package: a top-level module named `kernels` would clash with the PyPI package of that name.
    package_dir={"torch_medloss.kernels": "kernels", "torch_medloss.csrc": "csrc"},
    # The same files torch_medloss/_extension.py compiles and hashes (_SOURCE_PATTERNS, _CUDA_SOURCE_PATTERNS, headers
    # at any depth by _HEADER_SUFFIXES): a wheel's library is found again only if the installed csrc/ hashes as the
    # one it was built from.
    package_data={
        "torch_medloss.csrc": ["*.cpp", "cpu/*.cpp", "cuda/*.cu", "**/*.h", "**/*.cuh", "**/*.hpp", "**/*.inc"],
    },
    include_package_data=False,
    cmdclass={"build_py": BuildPyWithExtension},
    distclass=BinaryDistribution,
)
