"""The batch-size trade-off: its fit, the brute-force noise scale, the CLI end to end, and virtual == real."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from distaccum.tools import cli
from distaccum.tools.survey.noise import brute_force_noise_scale
from distaccum.tools.survey.tradeoff import digits_split, fit_tradeoff, train_to_target
from tests.helpers.fixtures import one_thread  # noqa: F401  (autouse: one torch thread per test)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "survey" / "tradeoff"


def fit_by_normal_equations(sizes: list[float], steps: list[float]) -> tuple[float, float]:
    """min sum ((S - S_min - E_min / B) / S)^2, solved by hand (2 x 2), independently of the code under test."""
    rows = [(1 / s, 1 / (b * s)) for b, s in zip(sizes, steps, strict=True)]
    a11 = sum(u * u for u, _ in rows)
    a12 = sum(u * v for u, v in rows)
    a22 = sum(v * v for _, v in rows)
    r1, r2 = sum(u for u, _ in rows), sum(v for _, v in rows)
    det = a11 * a22 - a12 * a12
    return (r1 * a22 - r2 * a12) / det, (a11 * r2 - a12 * r1) / det


def test_fit_recovers_known_s_min_and_e_min_from_exact_points() -> None:
    sizes = [16, 32, 64, 128, 256, 512, 1024]
    s_min, e_min = 12.5, 3000.0
    steps = [s_min + e_min / b for b in sizes]
    fit = fit_tradeoff(sizes, steps)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
    assert fit["e_min"] == pytest.approx(e_min, rel=1e-9)
    assert fit["b_crit"] == pytest.approx(e_min / s_min, rel=1e-9)
    assert fit["rms_relative_error"] == pytest.approx(0, abs=1e-9)
    # On the fitted hyperbola (S/S_min - 1)(E/E_min - 1) = 1, with E = B S.
    for size, count in zip(sizes, steps, strict=True):
        assert (count / fit["s_min"] - 1) * (size * count / fit["e_min"] - 1) == pytest.approx(1, rel=1e-9)


def test_fit_with_noisy_points_is_the_relative_least_squares_solution() -> None:
    sizes = [16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
    wobble = [1.06, 0.95, 1.02, 0.97, 1.04, 0.98, 1.03]
    steps = [(20 + 5000 / b) * w for b, w in zip(sizes, wobble, strict=True)]
    fit = fit_tradeoff(sizes, steps)
    s_min, e_min = fit_by_normal_equations(sizes, steps)
    assert (fit["s_min"], fit["e_min"]) == pytest.approx((s_min, e_min), rel=1e-9)
    assert fit["s_min"] == pytest.approx(20, rel=0.15) and fit["e_min"] == pytest.approx(5000, rel=0.1)
    assert 0.01 < fit["rms_relative_error"] < 0.06


def test_fit_without_a_tradeoff_has_no_critical_batch() -> None:
    # Samples that fall with the batch (steps fall faster than 1/B): no positive S_min, so no B_crit.
    fit = fit_tradeoff([16, 64, 256], [1000.0, 100.0, 10.0])
    assert fit["s_min"] < 0 and fit["b_crit"] is None


def test_fit_needs_two_batch_sizes() -> None:
    with pytest.raises(ValueError, match=r"the fit needs steps for at least 2 distinct batch sizes, got \[64, 64\]"):
        fit_tradeoff([64, 64], [10.0, 11.0])


def test_noise_scale_of_linear_regression_matches_its_closed_form() -> None:
    generator = torch.Generator().manual_seed(3)
    count, features = 40, 3
    inputs = torch.randn(count, features, generator=generator, dtype=torch.float64)
    targets = torch.randn(count, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(features, 1).to(torch.float64)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    # (w.x + b - y)^2 has per-sample gradient 2 r_i z_i, z_i = (x_i, 1), r_i the residual: no autograd needed.
    with torch.no_grad():
        residual = (inputs @ model.weight.T + model.bias - targets).squeeze(1)
    z = torch.cat([inputs, torch.ones(count, 1, dtype=torch.float64)], dim=1)
    mean = 2 * (residual[:, None] * z).mean(dim=0)
    # sum_i |g_i - g|^2 = sum_i |g_i|^2 - N |g|^2 = 4 sum_i r_i^2 |z_i|^2 - N |g|^2
    trace = (4 * (residual.square() * z.square().sum(dim=1)).sum() - count * mean.square().sum()) / (count - 1)
    grad_sq = mean.square().sum() - trace / count
    figures = brute_force_noise_scale(model, inputs, targets, nn.functional.mse_loss, chunk_size=7)
    assert set(figures) == {"trace_sigma", "grad_sq", "b_simple"}
    assert figures["trace_sigma"] == pytest.approx(float(trace), rel=1e-12)
    assert figures["grad_sq"] == pytest.approx(float(grad_sq), rel=1e-12)
    assert figures["b_simple"] == pytest.approx(float(trace / grad_sq), rel=1e-12)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_noise_scale_by_hand_and_when_the_gradient_is_lost_in_the_noise() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    # At w = 0 the per-sample gradients of (w x - y)^2 are -2 x y = -2 and -6: mean -4, variance 8.
    figures = brute_force_noise_scale(model, torch.ones(2, 1), torch.tensor([[1.0], [3.0]]), nn.functional.mse_loss)
    assert figures == pytest.approx({"trace_sigma": 8.0, "grad_sq": 16.0 - 8.0 / 2, "b_simple": 8.0 / 12.0})
    # Gradients -2 and +2: mean 0, so |G|^2 - tr(Sigma) / N < 0 and B_simple is infinite.
    lost = brute_force_noise_scale(model, torch.ones(2, 1), torch.tensor([[1.0], [-1.0]]), nn.functional.mse_loss)
    assert lost["grad_sq"] == pytest.approx(-8.0 / 2) and lost["b_simple"] == math.inf


def test_noise_scale_rejects_a_single_sample() -> None:
    with pytest.raises(ValueError, match=r"needs at least 2 samples \(a variance\), got 1"):
        brute_force_noise_scale(nn.Linear(2, 1), torch.zeros(1, 2), torch.zeros(1, 1), nn.functional.mse_loss)


def real_batch_curve(task, global_batch_size: int, lr: float, steps: int) -> tuple[list[float], list[float]]:
    """A plain PyTorch loop over the same stream: one real batch per step, no distaccum."""
    model = task.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batch_losses, train_losses = [], []
    for step in range(steps):
        inputs, targets = task.batches(step, global_batch_size)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        batch_losses.append(loss.item())
        with torch.no_grad():
            train_losses.append(nn.functional.cross_entropy(model(task.train[0]), task.train[1]).item())
    return batch_losses, train_losses


def max_relative_gap(values: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(values, reference, strict=True))


@pytest.mark.parametrize(("global_batch_size", "lr"), [(64, 0.1), (256, 0.2)])
def test_virtual_batch_run_equals_the_real_batch_loop(global_batch_size: int, lr: float) -> None:
    task = digits_split(seed=0)
    run = train_to_target(task, global_batch_size, lr, target_loss=0.0, max_steps=30)
    assert run.status == "cut" and len(run.losses) == 30 and run.steps is None
    batch_losses, train_losses = real_batch_curve(task, global_batch_size, lr, 30)
    assert train_losses[-1] < 0.5 * train_losses[0]  # it trained
    # float64: rounding only (a weighting error shows at 1e-3 and above).
    assert max_relative_gap(run.step_losses, batch_losses) < 1e-12
    assert max_relative_gap(run.losses, train_losses) < 1e-12
    # The same check separates a different batch: it is able to fail.
    small = train_to_target(task, 16, lr, target_loss=0.0, max_steps=30)
    assert max_relative_gap(small.losses, train_losses) > 1e-3


def test_run_stops_at_the_target_and_reports_held_out_accuracy() -> None:
    task = digits_split(seed=0)
    assert (len(task.train[1]), len(task.heldout[1])) == (1500, 297)
    run = train_to_target(task, 64, 0.1, target_loss=0.5, max_steps=200)
    assert run.status == "reached" and run.steps == len(run.losses)
    assert run.losses[-1] <= 0.5 < min(run.losses[:-1])
    assert run.heldout_accuracy is not None and 0.8 < run.heldout_accuracy <= 1


def check_outputs(folder: Path) -> dict:
    """Every figure of ``tradeoff.json`` against ``tradeoff.csv`` and the fit recomputed by hand."""
    summary = json.loads((folder / "tradeoff.json").read_text())
    with open(folder / "tradeoff.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    done = [row for row in summary["points"] if row["steps"] is not None]
    assert [int(row["global_batch_size"]) for row in table] == [row["global_batch_size"] for row in done]
    for line, row in zip(table, done, strict=True):
        assert float(line["steps"]) == row["steps"] == sum(row["steps_per_seed"]) / summary["config"]["seeds"]
        assert float(line["samples"]) == row["samples"] == row["steps"] * row["global_batch_size"]
        assert float(line["lr"]) == row["lr"] and float(line["cpu_seconds"]) == row["cpu_seconds"] > 0
        assert row["accum_steps"] * summary["config"]["micro_batch_size"] == row["global_batch_size"]
        assert row["final_train_loss"] <= summary["config"]["target_loss"]
        # The chosen learning rate is the fewest steps among those tried, and it is among them.
        reached = [t["steps"] for t in row["tried"] if t["steps"] is not None]
        assert row["steps"] == min(reached) and row["lr"] in [t["lr"] for t in row["tried"]]
    s_min, e_min = fit_by_normal_equations([r["global_batch_size"] for r in done], [r["steps"] for r in done])
    fit = summary["fit"]
    assert (fit["s_min"], fit["e_min"]) == pytest.approx((s_min, e_min), rel=1e-9)
    assert fit["b_crit"] == pytest.approx(e_min / s_min, rel=1e-9)
    noise = summary["noise_scale"]
    assert noise[0]["step"] == 0 and [p["step"] for p in noise] == sorted({p["step"] for p in noise})
    for point in noise:
        assert point["b_simple"] == pytest.approx(point["trace_sigma"] / point["grad_sq"], rel=1e-12)
    from matplotlib.image import imread

    height, width, _ = imread(folder / "tradeoff.png").shape
    assert height > 300 and width > 500
    return summary


def test_quick_cli_run_writes_the_figure_and_consistent_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["survey", "--tradeoff", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    summary = check_outputs(tmp_path)
    rows = summary["points"]
    assert [row["global_batch_size"] for row in rows] == [16, 64, 256]
    steps = [row["steps"] for row in rows]
    assert all(steps) and steps == sorted(steps, reverse=True)  # bigger batches: fewer steps...
    assert rows[-1]["samples"] > rows[0]["samples"]  # ...at more samples
    printed = capsys.readouterr().out
    assert f"B_crit {summary['fit']['b_crit']}" in printed and "held-out acc" in printed


def test_committed_example_is_consistent() -> None:
    summary = check_outputs(EXAMPLE)
    assert [row["global_batch_size"] for row in summary["points"]] == [16, 32, 64, 128, 256, 512, 1024]
    assert summary["config"]["micro_batch_size"] == 16 and summary["config"]["target_loss"] == 0.05
    readme = (REPO / "examples" / "survey" / "README.md").read_text()
    assert "distaccum survey --tradeoff --out examples/survey/tradeoff" in readme
    assert f"{summary['fit']['b_crit']:.0f}" in readme


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "16", "40"], r"global_batch_size 40 is not accum_steps x micro_batch_size x world_size"),
        (["--target-loss", "0"], r"--target-loss and --max-epochs must be > 0"),
        (["--quick", "--noise-batch-size", "32"], r"--noise-batch-size 32 is not one of --batch-sizes \[16, 64, 256\]"),
    ],
)
def test_cli_rejects_bad_tradeoff_options_with_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["survey", "--tradeoff", "--no-progress", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_tradeoff_refuses_several_ranks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["survey", "--tradeoff", "--quick", "--no-progress"]) == 2
    assert "--tradeoff runs on one process" in capsys.readouterr().err
