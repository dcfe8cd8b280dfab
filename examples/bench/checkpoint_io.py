"""Save and load time of a 16.8M-parameter checkpoint (Adam state too), side by side for two source trees.

    python examples/bench/checkpoint_io.py --trees /path/to/old/tree . --rounds 7 --json checkpoint-io.json

Each round runs one child process per tree, in alternating order (A B, B A, ...), so that drift of the machine
hits both alike; a child builds the model, times ``checkpoint.save`` and ``checkpoint.load`` of it into a fresh
directory (after one untimed warm-up of each) and prints the two times. The figures are medians over rounds and
the median of the per-round ratios (second tree / first tree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH = 2048
LAYERS = 4  # 4 x (2048 x 2048 + 2048) = 16.8M parameters


def child(width: int) -> None:
    """One measurement on the distaccum importable here: prints {"params", "save_s", "load_s"} as JSON."""
    import torch

    from distaccum import Accumulator, BatchPlan, checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(LAYERS)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    acc = Accumulator(model, optimizer, BatchPlan(accum_steps=1, micro_batch_size=2))
    with acc.micro_step():
        acc.backward(model(torch.randn(2, width)).square().mean())
    figures = {"params": sum(p.numel() for p in model.parameters())}
    with tempfile.TemporaryDirectory() as directory:
        for label in ("warmup", "timed"):
            started = time.perf_counter()
            checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc, keep=1)
            saved = time.perf_counter()
            checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc)
            loaded = time.perf_counter()
            if label == "timed":
                figures["save_s"] = saved - started
                figures["load_s"] = loaded - saved
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, required=True, help="two source trees (their distaccum/ is imported)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--width", type=int, default=WIDTH, help="of each of the 4 square layers (CI: a small one)")
    parser.add_argument("--json", type=Path, help="write the per-round figures and the summary here")
    options = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in options.trees}
    for round_index in range(options.rounds):
        order = options.trees if round_index % 2 == 0 else list(reversed(options.trees))
        for tree in order:
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": "1"}
            output = subprocess.run(
                [sys.executable, __file__, "--child", str(options.width)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[tree].append(json.loads(output.splitlines()[-1]))
    first, second = options.trees
    summary = {}
    for figure in ("save_s", "load_s"):
        ratios = [b[figure] / a[figure] for a, b in zip(runs[first], runs[second], strict=True)]
        summary[figure] = {
            first: statistics.median(run[figure] for run in runs[first]),
            second: statistics.median(run[figure] for run in runs[second]),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    print(f"{runs[first][0]['params']:,} parameters, {options.rounds} rounds")
    for figure, row in summary.items():
        print(
            f"{figure}: {first} {row[first]:.3f} s, {second} {row[second]:.3f} s, ratio {row['ratio_median']:.3f} "
            f"(min {row['ratio_min']:.3f}, max {row['ratio_max']:.3f})"
        )
    if options.json is not None:
        options.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]))
    else:
        main()
