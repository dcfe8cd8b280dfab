"""The public surface: a few names, and no heavy optional imports."""

from __future__ import annotations

import subprocess
import sys
import types

import distaccum


def test_public_names_are_pinned():
    assert sorted(distaccum.__all__) == ["Accumulator", "BatchPlan", "BatchSchedule", "StepResult", "__version__"]
    # Submodules become attributes once imported; everything else public must be listed in __all__.
    public = {
        name
        for name, value in vars(distaccum).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(distaccum.__all__) - {"__version__"}


def test_import_does_not_import_accelerate_deepspeed_or_plotting():
    code = (
        "import sys, distaccum, distaccum.backends, distaccum.accumulator, distaccum.checkpoint;"
        "heavy = [m for m in ('accelerate', 'deepspeed', 'matplotlib', 'sklearn', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_ships_type_information():
    from importlib.resources import files

    assert files("distaccum").joinpath("py.typed").is_file()
