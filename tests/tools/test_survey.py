"""The learning-rate survey: the virtual batch lies on the real batch's curve, on one process and under torchrun."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distaccum import BatchPlan
from distaccum.dist import free_port
from distaccum.tools import cli
from distaccum.tools.survey import (
    Curve,
    SurveyConfig,
    SurveyResult,
    default_configs,
    digits_task,
    divergence_step,
    lr_survey,
    summarize,
)
from tests.helpers.fixtures import one_thread  # noqa: F401  (autouse: one torch thread per test)

REPO = Path(__file__).resolve().parents[2]
# A short survey that still crosses the whole range: every curve diverges before its 60 steps are over.
GLOBAL, MICRO, LR_MIN, LR_MAX, STEPS = 64, 8, 1e-2, 30.0, 60
CLI_ARGS = ["-B", "64", "-b", "8", "--lr-min", "1e-2", "--lr-max", "30", "--steps", "60", "--no-progress"]
# |virtual - real| / real before divergence. float64 measures ~1e-13 (README: 3.4e-13, 8e-14 under torchrun); a
# 1e-12 bound fails on any weighting error. float32 rounding grows to ~1e-4 just before the blow-up.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-12}


def survey_digits(dtype: torch.dtype) -> SurveyResult:
    make_model, batches = digits_task(seed=0, dtype=dtype)
    return lr_survey(
        make_model,
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        nn.functional.cross_entropy,
        batches,
        default_configs(GLOBAL, MICRO),
        lr_min=LR_MIN,
        lr_max=LR_MAX,
        steps=STEPS,
    )


@pytest.fixture(scope="module")
def reference() -> SurveyResult:
    """The single-process survey in float64 (the CLI's default dtype), computed once for the module."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return survey_digits(torch.float64)
    finally:
        torch.set_num_threads(saved)


def read_curves(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["config", "step", "lr", "loss"]
        curves: dict[str, list[tuple[int, float, float]]] = {}
        for name, step, lr, loss in reader:
            curves.setdefault(name, []).append((int(step), float(lr), float(loss)))
    return curves


def stop_index(losses: list[float], factor: float, smoothing: float) -> int | None:
    """The stop rule written again from its definition, independently of distaccum.tools.survey."""
    ema, lowest = 0.0, math.inf
    for count, loss in enumerate(losses, start=1):
        ema = smoothing * ema + (1 - smoothing) * loss
        value = ema / (1 - smoothing**count)
        lowest = min(lowest, value)
        if math.isnan(value) or math.isinf(value) or value > factor * lowest:
            return count - 1
    return None


def relative_gaps(curve: list[float], reference: list[float], steps: int) -> list[float]:
    return [abs(curve[i] - reference[i]) / abs(reference[i]) for i in range(steps)]


def alive_steps(*curves: list[float]) -> int:
    """Steps before the earliest divergence among ``curves`` (all of them when none diverged)."""
    stops = [stop_index(losses, 4.0, 0.9) for losses in curves]
    return min(len(losses) if stop is None else stop for losses, stop in zip(curves, stops, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_virtual_curve_equals_real_curve_on_one_process(dtype: torch.dtype) -> None:
    result = survey_digits(dtype)
    real, virtual, small = result.curves
    assert (real.plan.accum_steps, virtual.plan.accum_steps, small.plan.accum_steps) == (1, 8, 1)
    assert real.lrs == virtual.lrs and real.lrs[0] == pytest.approx(LR_MIN)
    ratios = [after / before for before, after in zip(real.lrs, real.lrs[1:], strict=False)]
    assert ratios == pytest.approx([(LR_MAX / LR_MIN) ** (1 / (STEPS - 1))] * len(ratios), rel=1e-9)
    compared = alive_steps(real.losses, virtual.losses)
    assert compared >= 25, "too few steps before divergence to compare the curves"
    gaps = relative_gaps(virtual.losses, real.losses, compared)
    bound = TOLERANCE[dtype]
    assert max(gaps) <= bound, [f"step {i}: {gap:.2e}" for i, gap in enumerate(gaps) if gap > bound]
    # The same comparison separates the small batch from the real one: it is able to fail.
    assert max(relative_gaps(small.losses, real.losses, alive_steps(real.losses, small.losses))) > 1e-2
    for curve in result.curves:
        # Each curve stops exactly at the first step the rule calls divergence (and this short run reaches it).
        assert stop_index(curve.losses, 4.0, 0.9) == len(curve.losses) - 1 < STEPS - 1


def check_summary_against_csv(folder: Path) -> dict:
    """Recompute every figure of ``summary.json`` from ``survey.csv`` and compare; return the summary."""
    curves = read_curves(folder / "survey.csv")
    summary = json.loads((folder / "summary.json").read_text())
    assert list(curves) == ["real", "virtual", "small"] == list(summary["configs"])
    for name, points in curves.items():
        lrs, losses = [p[1] for p in points], [p[2] for p in points]
        assert [p[0] for p in points] == list(range(len(points)))
        figures = summary["configs"][name]
        stop = stop_index(losses, summary["divergence_factor"], summary["smoothing"])
        assert figures["lr_at_divergence"] == (None if stop is None else lrs[stop])
        assert figures["lr_at_min_loss"] == lrs[losses.index(min(losses))]
        assert figures["min_loss"] == min(losses)
    real, virtual = ([p[2] for p in curves[name]] for name in ("real", "virtual"))
    compared = alive_steps(real, virtual)
    (pair,) = summary["pairs"]
    assert (pair["a"], pair["b"], pair["steps_compared"]) == ("real", "virtual", compared)
    assert pair["max_relative_distance"] == pytest.approx(max(relative_gaps(virtual, real, compared)), rel=1e-12)
    assert summary["max_relative_distance"] == pair["max_relative_distance"] <= TOLERANCE[torch.float64]
    return summary


def test_cli_outputs_and_summary_come_from_the_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["survey", *CLI_ARGS, "--out", str(tmp_path)]) == 0
    summary = check_summary_against_csv(tmp_path)
    from matplotlib.image import imread

    height, width, _ = imread(tmp_path / "survey.png").shape
    assert height > 300 and width > 500
    printed = capsys.readouterr().out
    assert f"{summary['max_relative_distance']:.4g}" in printed and "real 64 x 1 x 1 = 64" in printed


def test_committed_example_summary_matches_its_csv() -> None:
    summary = check_summary_against_csv(REPO / "examples" / "survey")
    assert summary["configs"]["virtual"]["accum_steps"] == 16  # the README's command: B 256 = 16 x 16
    stated = f"{summary['max_relative_distance']:.1e}"  # the figure the README quotes is this run's
    assert stated == "3.4e-13" and f"**{stated}**" in (REPO / "README.md").read_text()


def test_cli_reports_an_impossible_batch_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["survey", "-B", "256", "-b", "24", "--no-progress"]) == 2
    assert "error: global_batch_size 256 is not accum_steps x micro_batch_size x world_size" in (
        capsys.readouterr().err
    )


def synthetic_curve(name: str, losses: list[float], global_batch_size: int = 64) -> Curve:
    plan = BatchPlan(global_batch_size=global_batch_size, accum_steps=1, world_size=1)
    lrs = [0.01 * 1.5**step for step in range(len(losses))]
    return Curve(name=name, plan=plan, steps=list(range(len(losses))), lrs=lrs, losses=list(losses))


def test_summary_changes_when_a_curve_changes() -> None:
    losses = [2.3, 2.0, 1.5, 1.0, 0.8, 0.7, 0.75, 0.9]
    base = summarize([synthetic_curve("real", losses), synthetic_curve("virtual", losses)])
    assert base["max_relative_distance"] == 0.0 and base["pairs"][0]["steps_compared"] == len(losses)
    assert base["configs"]["real"]["lr_at_min_loss"] == pytest.approx(0.01 * 1.5**5)
    assert base["configs"]["real"]["lr_at_divergence"] is None

    nudged = [*losses[:3], losses[3] * 1.01, *losses[4:]]
    assert summarize([synthetic_curve("real", losses), synthetic_curve("virtual", nudged)])[
        "max_relative_distance"
    ] == pytest.approx(0.01)

    lower = [*losses[:2], 0.1, *losses[3:]]
    assert summarize([synthetic_curve("real", lower)])["configs"]["real"]["lr_at_min_loss"] == pytest.approx(
        0.01 * 1.5**2
    )

    blown = [*losses, 40.0]
    figures = summarize([synthetic_curve("real", blown), synthetic_curve("virtual", blown)])
    assert figures["configs"]["real"]["lr_at_divergence"] == pytest.approx(0.01 * 1.5**8)
    assert figures["pairs"][0]["steps_compared"] == 8  # the divergent step itself is not compared
    assert divergence_step(blown, 4.0, 0.0) == 8 and divergence_step(losses, 4.0, 0.0) is None

    # Configurations with different global batches are never compared with each other.
    assert summarize([synthetic_curve("real", losses), synthetic_curve("small", nudged, 8)])["pairs"] == []


def test_survey_never_changes_the_users_model() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs, targets = torch.randn(32, 4), torch.randint(0, 2, (32,))
    result = lr_survey(
        model,
        lambda params: torch.optim.SGD(params, lr=0.1),
        nn.functional.cross_entropy,
        lambda step, size: (inputs[:size], targets[:size]),
        default_configs(16, 4),
        lr_min=0.1,
        lr_max=1.0,
        steps=3,
    )
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(len(curve.losses) == 3 for curve in result.curves)
    # The survey did train: losses move, and every configuration started from the user's weights.
    first = nn.functional.cross_entropy(model(inputs[:16]), targets[:16]).item()
    assert result.curves[0].losses[0] == pytest.approx(first) and result.curves[0].losses[2] != first


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr_min": 1.0, "lr_max": 0.1}, r"need 0 < lr_min < lr_max, got lr_min=1.0, lr_max=0.1"),
        ({"steps": 1}, r"steps must be >= 2 .* got 1"),
        ({"divergence_factor": 1.0}, r"divergence_factor must be > 1, got 1.0"),
        ({"smoothing": 1.0}, r"smoothing must be in \[0, 1\), got 1.0"),
        ({"configs": [SurveyConfig(name="a", global_batch_size=8)] * 2}, r"unique names .* \['a', 'a'\]"),
        (
            {"configs": [SurveyConfig(name="odd", global_batch_size=64, micro_batch_size=5)]},
            r"global_batch_size 64 is not accum_steps x micro_batch_size x world_size.*nearest valid: 60 or 65",
        ),
    ],
)
def test_bad_arguments_raise_before_training(change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "configs": default_configs(16, 4),
        "lr_min": 0.01,
        "lr_max": 1.0,
        "steps": 3,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        lr_survey(nn.Linear(2, 2), torch.optim.SGD, nn.functional.mse_loss, lambda s, n: (None, None), **arguments)  # type: ignore[arg-type]


def test_survey_config_needs_sizes_and_a_plain_name() -> None:
    with pytest.raises(ValueError, match=r"SurveyConfig 'v' needs global_batch_size, or micro_batch_size and"):
        SurveyConfig(name="v", micro_batch_size=4)
    with pytest.raises(ValueError, match=r"name must be a non-empty label without commas, got 'a,b'"):
        SurveyConfig(name="a,b", global_batch_size=8)
    assert SurveyConfig(name="v", micro_batch_size=4, accum_steps=3).plan(2).global_batch_size == 24


def test_progress_without_tqdm_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r"pip install 'distaccum\[survey\]'"):
        lr_survey(
            nn.Linear(2, 2),
            torch.optim.SGD,
            nn.functional.mse_loss,
            lambda step, size: (torch.zeros(size, 2), torch.zeros(size, 2)),
            default_configs(4, 2),
            lr_min=0.01,
            lr_max=1.0,
            steps=2,
            progress=True,
        )


@pytest.mark.slow
def test_torchrun_two_ranks_match_the_single_process_real_batch(tmp_path: Path, reference: SurveyResult) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{free_port()}",
        "-m",
        "distaccum",
        "survey",
        *CLI_ARGS,
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    sizes = json.loads((tmp_path / "summary.json").read_text())["configs"]
    assert [(s["micro_batch_size"], s["accum_steps"], s["world_size"]) for s in sizes.values()] == [
        (32, 1, 2),
        (8, 4, 2),
        (4, 1, 2),
    ]
    distributed = read_curves(tmp_path / "survey.csv")
    single = {curve.name: curve.losses for curve in reference.curves}
    for name, expected in [("real", "real"), ("virtual", "real"), ("small", "small")]:
        losses = [point[2] for point in distributed[name]]
        compared = alive_steps(losses, single[expected])
        assert compared >= 25
        gaps = relative_gaps(losses, single[expected], compared)
        bound = TOLERANCE[torch.float64]
        assert max(gaps) <= bound, (name, [f"step {i}: {gap:.2e}" for i, gap in enumerate(gaps) if gap > bound])
        assert len(losses) == len(single[expected]), f"{name} stopped at another step than on one process"
