"""The README's first command: the demo runs as a user would start it and reports a real equivalence figure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launchers import run_torchrun

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def equivalence_figure(output: str) -> float:
    match = re.search(r"differ from one real batch of 64 in one process by at most ([0-9.e+-]+)", output)
    assert match, output
    return float(match.group(1))


def test_demo_single_process():
    result = subprocess.run([sys.executable, str(DEMO), "--steps", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accum_steps 8 x micro_batch_size 8 x world_size 1" in result.stdout
    assert len(re.findall(r"^\s+\d+\s+\d+\.\d+\s+\d+\.\d+\s+8$", result.stdout, flags=re.MULTILINE)) == 4
    assert 0 < equivalence_figure(result.stdout) <= 1e-6


@pytest.mark.slow
def test_demo_under_torchrun_two_ranks():
    result = run_torchrun(2, str(DEMO), "--steps", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accum_steps 4 x micro_batch_size 8 x world_size 2 (backend: ddp" in result.stdout
    assert 0 < equivalence_figure(result.stdout) <= 1e-6
