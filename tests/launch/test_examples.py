"""The examples, launched as a user launches them, end with the weights of one process on the real global batch."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.common import max_relative_error
from tests.helpers.examples import (
    EXAMPLES,
    SIZES,
    STEPS,
    TOLERANCE,
    assert_matches_reference,
    reference_weights,
)
from tests.helpers.launchers import ROOT, finish, free_port, launch, start, user_env


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python examples/train.py` once for the module: 1 process, accum_steps 4."""
    path = tmp_path_factory.mktemp("python") / "weights.pt"
    output = launch([sys.executable, EXAMPLES / "train.py", *SIZES, "--steps", str(STEPS), "--save", path])
    assert "accum_steps 4 x micro_batch_size 8 x world_size 1" in output
    assert "launcher=python" in output and "backend=plain" in output
    return path


def test_train_one_process_equals_real_batch(one_process_weights: Path) -> None:
    assert_matches_reference(one_process_weights, reference_weights(STEPS))


def test_train_differs_from_reference_with_other_steps(one_process_weights: Path) -> None:
    # The comparison can fail: one step more or less is far outside the tolerance.
    weights = torch.load(one_process_weights, weights_only=True)
    assert max_relative_error(weights, reference_weights(STEPS - 1)) > 1e3 * TOLERANCE


def test_plain_torch_twin_and_distaccum_twin_end_equal(tmp_path: Path) -> None:
    # The twins run side by side (2 cores): the hand-written loop and the Accumulator give the same weights.
    runs = {
        name: start([sys.executable, EXAMPLES / f"{name}.py", *SIZES, "--steps", str(STEPS), "--save", tmp_path / name])
        for name in ("plain_torch", "with_distaccum")
    }
    expected = reference_weights(STEPS)
    for name, process in runs.items():
        code, output = finish(process)
        assert code == 0, output
        assert_matches_reference(tmp_path / name, expected)
    plain = torch.load(tmp_path / "plain_torch", weights_only=True)
    assert max_relative_error(torch.load(tmp_path / "with_distaccum", weights_only=True), plain) <= TOLERANCE


def test_twins_differ_only_in_the_accumulation() -> None:
    # The pair exists for its diff: same task calls, same flags; only the twin with distaccum imports it.
    plain = (EXAMPLES / "plain_torch.py").read_text()
    ours = (EXAMPLES / "with_distaccum.py").read_text()
    flags = re.compile(r'add_argument\("(--[\w-]+)"')
    assert flags.findall(plain) == flags.findall(ours)
    assert "distaccum" not in plain.split('"""', 2)[2]
    assert "acc.micro_step()" in ours and "no_sync()" in plain and "no_sync" not in ours


@pytest.mark.slow
def test_train_under_accelerate_launch_two_cpu_processes(tmp_path: Path, one_process_weights: Path) -> None:
    # train.py has no Accelerate code: accelerate launch's torchrun environment is enough (2 ranks, accum 2).
    path = tmp_path / "weights.pt"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    output = launch(
        [*command, EXAMPLES / "train.py", *SIZES, "--steps", str(STEPS), "--save", path],
        user_env(ACCELERATE_USE_CPU="1"),
    )
    assert "accum_steps 2 x micro_batch_size 8 x world_size 2" in output
    assert "launcher=accelerate" in output and "backend=ddp" in output
    assert_matches_reference(path, reference_weights(STEPS))
    # 2 ranks x accum 2 and 1 rank x accum 4 at the same global batch: the same weights.
    assert max_relative_error(torch.load(path), torch.load(one_process_weights)) <= TOLERANCE


def test_example_docstrings_list_launch_commands_that_exist() -> None:
    for name, launchers in {
        "train.py": ("python examples/train.py", "torchrun", "--nnodes 2", "accelerate launch", "deepspeed", "sbatch"),
        "accelerate_train.py": ("accelerate launch", "ACCELERATE_USE_CPU=1"),
        "plain_torch.py": ("python examples/plain_torch.py", "torchrun"),
        "with_distaccum.py": ("python examples/with_distaccum.py", "torchrun"),
        "batches.py": ("python examples/batches.py", "torchrun"),
        "noise_scale.py": ("python examples/noise_scale.py",),
    }.items():
        doc = (EXAMPLES / name).read_text().split('"""')[1]
        for launcher in launchers:
            assert launcher in doc, f"examples/{name} docstring lacks a `{launcher}` command"
        for referenced in re.findall(r"(?:launch|examples)/[\w./-]+\.(?:py|sh|sbatch|yaml|json)", doc):
            assert (ROOT / referenced).is_file(), f"examples/{name} docstring names missing file {referenced}"


NORMS = (
    "BatchNorm (torch's per-micro-batch updates)",
    'BatchNorm, batch_norm="exact"',
    "GroupNorm (8 groups)",
    "LayerNorm",
)


def test_batchnorm_example_shows_what_accumulation_keeps_exact() -> None:
    output = launch([sys.executable, EXAMPLES / "batchnorm.py", "--steps", "8"])
    gaps = {line[:46].strip(): float(line[46:71]) for line in output.splitlines() if line[:46].strip() in NORMS}
    assert len(gaps) == 4, output
    batch_norm = [gap for label, gap in gaps.items() if label.startswith("BatchNorm")]
    per_sample = [gap for label, gap in gaps.items() if not label.startswith("BatchNorm")]
    assert all(gap <= 1e-12 for gap in per_sample), gaps  # GroupNorm and LayerNorm accumulate exactly
    assert batch_norm[0] == batch_norm[1] > 1e-3, gaps  # per-micro-batch normalization; exact stats don't change it


def _table(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if re.fullmatch(r"\s*\d+\s+\d+\s+\d+\s+\d+\s+\d+\s.*", line)]


@pytest.mark.parametrize("ranks", [1, 2])
def test_batches_example_ramps_up_finds_the_micro_batch_and_equals_the_real_batches(ranks: int) -> None:
    script = [EXAMPLES / "batches.py", "--memory-limit", "6", "--steps", "13"]
    if ranks == 1:
        output = launch([sys.executable, *script])
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        output = launch([torchrun, "--standalone", "--nproc_per_node", "2", *script], user_env())
    rows = _table(output)
    # The linear ramp 32 -> 128 by 32 over 768 samples: 8 steps of 32, 4 of 64, then 96; accum = global / (4 x W).
    assert [int(row[1]) for row in rows] == [32] * 8 + [64] * 4 + [96], output
    assert [int(row[2]) for row in rows] == [int(row[1]) // (4 * ranks) for row in rows], output
    assert {row[3] for row in rows} == {"4"}, output  # micro-batch 8 ran out of memory (limit 6); 4 fits
    gap = float(re.search(r"vs the real batches in one process: (\S+)", output).group(1))
    assert gap <= 1e-6, output


def test_noise_scale_example_reports_the_estimate_next_to_the_brute_force() -> None:
    output = launch([sys.executable, EXAMPLES / "noise_scale.py", "--steps", "12", "--every", "6"])
    rows = [line.split() for line in output.splitlines() if re.fullmatch(r"\s*\d+\s+[\d.]+\s+[\d.]+(\s+[\d.]+)?", line)]
    assert [int(row[0]) for row in rows] == list(range(1, 13)), output
    online = [float(row[2]) for row in rows]
    exact = [float(row[3]) for row in rows if len(row) == 4]
    assert len(exact) == 2 and all(value > 0 for value in online + exact), output
    # The smoothed estimate is of the brute force's order (the committed run: 38-73 against 73 and 58).
    assert all(exact[0] / 3 < value < exact[0] * 3 for value in online[2:7]), output


def test_precision_example_shows_float32_sums_staying_at_the_real_batch() -> None:
    doc = (EXAMPLES / "precision.py").read_text().split('"""')[1]
    assert "python examples/precision.py" in doc and "torchrun" in doc and "examples/precision.txt" in doc
    output = launch([sys.executable, EXAMPLES / "precision.py", "--ks", "1", "64", "--windows", "1"])
    rows = {int(row[0]): row for row in (line.split() for line in output.splitlines()) if len(row) == 10}
    assert sorted(rows) == [1, 64], output
    assert rows[1][2] == rows[1][3], output  # one micro-step: the same gradient in either dtype
    in_bf16, in_fp32, one_backward = (float(rows[64][column]) for column in (2, 3, 4))
    # The committed run (examples/precision.txt): 1.0e-2 summed in bf16, 4.4e-3 in float32, 4.1e-3 one bf16 backward.
    assert in_fp32 < 0.6 * in_bf16 and in_fp32 < 1.3 * one_backward, output
    assert int(rows[64][7]) == 2 * int(rows[64][6]), output  # float32 sums: twice the bytes of the bf16 gradients
