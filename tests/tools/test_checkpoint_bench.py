"""The checkpoint save/load benchmark runs (CI-sized: small layers, one round of each tree); its committed result is
examples/bench/checkpoint-io-cpu.txt (16.8M parameters, 11 rounds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_checkpoint_benchmark_times_save_and_load_of_both_trees(tmp_path: Path) -> None:
    script = ROOT / "examples" / "bench" / "checkpoint_io.py"
    command = [sys.executable, str(script), "--trees", str(ROOT), str(ROOT), "--rounds", "2", "--width", "64"]
    output = subprocess.run(
        [*command, "--json", str(tmp_path / "io.json")], capture_output=True, text=True, timeout=300
    )
    assert output.returncode == 0, output.stderr
    result = json.loads((tmp_path / "io.json").read_text())
    assert result["runs"][str(ROOT)][0]["params"] == 4 * (64 * 64 + 64)
    for figure in ("save_s", "load_s"):
        row = result["summary"][figure]
        assert row[str(ROOT)] > 0 and row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    assert "save_s:" in output.stdout and "load_s:" in output.stdout
