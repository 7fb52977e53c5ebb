"""The contract constants are defined once per language: torch_medloss/_contract.py for Python (the references, the
op layer, the Triton kernels) and csrc/contract.h for C++ and CUDA. The two must agree name by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torch_medloss import _contract as K

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "contract.h"
# One declaration statement: `constexpr int64_t A = 0, B = 1;` (several declarators, possibly over several lines).
_STATEMENT = re.compile(r"constexpr\s+int64_t\s+([^;]*);")
_DECLARATOR = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*(-?\d+)\s*$")
# Python constants that are deliberately not in the header: the denoising ops' (concat_conv2d, frequency_split), which
# have no C++ kernels (_contract.py says so where it defines them). A new one must be added here on purpose.
PYTHON_ONLY: frozenset[str] = frozenset({"CONCAT_CONV_MAX_INPUTS", "FREQUENCY_SPLIT_TRITON_MAX_RADIUS"})


def header_constants(text: str) -> dict[str, int]:
    """NAME -> value of every `constexpr int64_t NAME = value` in the header (comments stripped first)."""
    text = re.sub(r"//[^\n]*", "", text)
    constants: dict[str, int] = {}
    for statement in _STATEMENT.finditer(text):
        for declarator in statement.group(1).split(","):
            match = _DECLARATOR.match(declarator)
            assert match, f"csrc/contract.h: cannot read the declarator {declarator.strip()!r}"
            name, value = match.group(1), int(match.group(2))
            assert name not in constants, f"csrc/contract.h defines {name} twice"
            constants[name] = value
    return constants


def python_constants() -> dict[str, int]:
    """NAME -> value of every int constant of torch_medloss._contract (functions and the module's imports aside)."""
    return {name: value for name, value in vars(K).items()
            if name.isupper() and isinstance(value, int) and not isinstance(value, bool)}


@pytest.fixture(scope="module")
def header():
    return header_constants(HEADER.read_text())


def test_the_parser_reads_several_declarators_per_line():
    text = "// constexpr int64_t IGNORED = 7;\nconstexpr int64_t A = 0, B_2 = -1;\nconstexpr int64_t C =\n    3;\n"
    assert header_constants(text) == {"A": 0, "B_2": -1, "C": 3}


def test_header_constants_agree_with_python(header):
    assert header, "no constant found in csrc/contract.h"
    python = python_constants()
    missing = sorted(name for name in header if name not in python)
    assert not missing, f"csrc/contract.h defines constants that torch_medloss._contract lacks: {missing}"
    wrong = {name: (value, python[name]) for name, value in header.items() if python[name] != value}
    assert not wrong, f"(C++, Python) values that differ: {wrong}"


def test_every_python_constant_is_in_the_header(header):
    missing = sorted(name for name in python_constants() if name not in header and name not in PYTHON_ONLY)
    assert not missing, f"torch_medloss._contract constants missing from csrc/contract.h: {missing}"


# The files checked below: the schemas and the CPU kernels. (csrc/cuda belongs to the CUDA port, which moves its
# own constants to the header; add "cuda/*" here once it has.)
_KERNEL_FILES = ("*.cpp", "*.h", "cpu/*")


def test_every_csrc_file_takes_the_codes_from_the_header():
    """No kernel file spells a code of the contract itself (the duplicates the header replaced)."""
    csrc = HEADER.parent
    duplicated = re.compile(r"constexpr\s+int64_t\s+k(Activation|Mask|NumSums|NumExtras|Element|MaxClasses|Head|"
                            r"Reduction|Focal|Alpha)\w*\s*=")
    paths = sorted({path for pattern in _KERNEL_FILES for path in csrc.glob(pattern)} - {HEADER})
    assert paths, f"no kernel file found under {csrc}"
    offenders = [str(path.relative_to(csrc)) for path in paths if duplicated.search(path.read_text())]
    assert not offenders, f"these files define contract constants of their own: {offenders}"
