"""Every example in a docstring runs and prints what it says (STYLE: public functions carry a runnable example)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import distaccum

PACKAGE = Path(distaccum.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" in path.read_text():
            parts = ["distaccum", *path.relative_to(PACKAGE).with_suffix("").parts]
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_examples_are_found():
    assert {"distaccum.accumulator", "distaccum.plan", "distaccum.schedule", "distaccum.uneven"} <= set(
        _modules_with_examples()
    )


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (printed above)"
