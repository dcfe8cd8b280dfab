"""The package as users get it: sdist and wheel build, hold every subpackage and py.typed, and run from a fresh venv;
the benchmark harness (examples/bench/harness) stays out of the wheel, and importing distaccum loads none of it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers.launchers import ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``python -m build``: the sdist first, then the wheel built from that sdist (so the sdist must be complete)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (wheel,) = out.glob("distaccum-*.whl")
    (sdist,) = out.glob("distaccum-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def package_files() -> set[str]:
    """What the source tree says the package is: every module and the py.typed marker."""
    source = ROOT / "distaccum"
    return {
        str(path.relative_to(ROOT))
        for path in source.rglob("*")
        if path.suffix == ".py" or path.name == "py.typed"
        if "__pycache__" not in path.parts
    }


def test_wheel_holds_every_module_and_py_typed(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = {name for name in wheel.namelist() if name.startswith("distaccum/")}
        entry_points = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
        scripts = wheel.read(entry_points).decode()
    assert package_files() - names == set(), "missing from the wheel"
    assert "distaccum/backends/deepspeed.py" in names
    assert "distaccum = distaccum.tools.cli:main" in scripts


def test_wheel_holds_no_benchmark_code(built: dict[str, Path]) -> None:
    # The harness runs from a checkout (python -m examples.bench.harness); users' wheels carry none of it.
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
    assert not [name for name in names if "bench" in name.lower()], "benchmark code in the wheel"
    assert not [name for name in names if name.startswith("examples/")], "examples in the wheel"


def test_the_cli_has_no_bench_command() -> None:
    from distaccum.tools import cli

    assert "bench" not in cli.COMMANDS
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])


def test_import_distaccum_loads_nothing_from_examples_or_the_bench() -> None:
    code = (
        "import sys, distaccum, distaccum.tools.cli;"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'examples'"
        " or m.startswith('distaccum') and 'bench' in m];"
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    # From the repository root, where examples/ is importable: distaccum still must not reach for it.
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sdist_holds_every_module_and_py_typed(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert package_files() - names == set(), "missing from the sdist"


def test_wheel_installed_in_a_fresh_venv_runs_the_cli(built: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", fresh_site, str(built["wheel"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # torch comes from this venv (appended after the fresh site-packages, so distaccum resolves to the wheel);
    # installing a second torch would take minutes and prove nothing about the package.
    (Path(fresh_site) / "dev-torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
    result = subprocess.run(
        [python, "-m", "distaccum", "env", "--global-batch-size", "32", "--micro-batch-size", "8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accum_steps 4 x micro_batch_size 8 x world_size 1" in result.stdout, result.stdout
    where = subprocess.run(
        [python, "-c", "import distaccum, distaccum.tools.cli; print(distaccum.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(fresh_site), f"imported from {where.stdout.strip()}, not the wheel"
