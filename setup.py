"""Packaging for torch_medloss.

Nothing here imports torch or compiles C++: the sources in csrc/ ship as package data and are built on first use
(or by ``python -m torch_medloss build``) with ``torch.utils.cpp_extension.load`` against the torch that is already
installed. That keeps ``pip install .`` from ever resolving a second torch inside an isolated build environment.
"""

from setuptools import find_packages, setup

setup(
    # Every torch_medloss.* package (models, bench, the study commands, ...) plus the two mapped directories.
    packages=[*find_packages(include=["torch_medloss", "torch_medloss.*"]), "torch_medloss.kernels",
              "torch_medloss.csrc"],
    # kernels/ and csrc/ live at the top of the repository (the project layout) but are installed inside the
    # package: a top-level module named `kernels` would clash with the PyPI package of that name.
    package_dir={"torch_medloss.kernels": "kernels", "torch_medloss.csrc": "csrc"},
    package_data={"torch_medloss.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.h"]},
    include_package_data=False,
)
