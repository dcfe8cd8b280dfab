"""Does the bigger virtual batch come out ahead? Steps and samples to a target loss, per global batch size.

Every global batch ``B`` trains through the :class:`~distaccum.Accumulator` as ``micro_batch_size x (B /
micro_batch_size)``, with its learning rate tuned on a log grid for the fewest optimizer steps to a target
training loss. McCandlish et al.'s trade-off ``(S/S_min - 1)(E/E_min - 1) = 1`` (steps ``S``, samples ``E``) is
fitted over the batch sizes and its critical batch ``B_crit = E_min / S_min`` compared with the brute-force
noise scale ``B_simple`` (:mod:`~distaccum.tools.survey.noise`) along a run. ``distaccum survey --tradeoff``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from distaccum.tools.survey.data import BatchFn, digits_task, stream_batches
from distaccum.tools.survey.noise import brute_force_noise_scale
from distaccum.tools.survey.optional import require

CSV_COLUMNS: tuple[str, ...] = ("global_batch_size", "accum_steps", "lr", "steps", "samples", "seconds")
CSV_COLUMNS += ("cpu_seconds", "heldout_accuracy")


@dataclass(frozen=True)
class SplitTask:
    """The digits with a fixed held-out part: the model factory, the training stream and both parts' tensors."""

    make_model: Callable[[], nn.Module]
    batches: BatchFn
    train: tuple[torch.Tensor, torch.Tensor]
    heldout: tuple[torch.Tensor, torch.Tensor]


def digits_split(seed: int = 0, hidden: int = 64, dtype: torch.dtype = torch.float64, heldout: int = 297) -> SplitTask:
    """scikit-learn's digits cut once (seeded) into ``1797 - heldout`` training and ``heldout`` held-out samples.

    Standardized with the training part's statistics; the model is :func:`digits_task`'s MLP and the training
    part is a :func:`stream_batches` stream, so every batch size sees the same samples in the same order.
    """
    digits = require("sklearn.datasets", "survey").load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float64)
    targets = torch.tensor(digits.target, dtype=torch.int64)
    if not 0 < heldout < inputs.shape[0] - 1:
        raise ValueError(f"heldout must be between 1 and {inputs.shape[0] - 2} samples, got {heldout}")
    order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed))
    train, held = order[heldout:], order[:heldout]
    mean, std = inputs[train].mean(dim=0), inputs[train].std(dim=0)
    inputs = ((inputs - mean) / torch.where(std > 0, std, torch.ones_like(std))).to(dtype)
    make_model, _ = digits_task(seed, hidden, dtype)
    stream = stream_batches(inputs[train], targets[train], seed=seed)
    return SplitTask(make_model, stream, (inputs[train], targets[train]), (inputs[held], targets[held]))


@dataclass
class Run:
    """One training run at one batch size and learning rate, until the target, divergence or the step cap."""

    global_batch_size: int
    lr: float
    status: str = "cut"
    """``reached``, ``diverged`` (a skipped step, a non-finite loss or twice the first) or ``cut`` (step cap)."""
    losses: list[float] = field(default_factory=list)
    """Loss over the whole training part after each optimizer step."""
    step_losses: list[float] = field(default_factory=list)
    """The window loss of each optimizer step (the Accumulator's, over the step's batch)."""
    seconds: float = 0.0
    """Wall time spent in training steps (evaluations excluded)."""
    cpu_seconds: float = 0.0
    """CPU time of this process in training steps: what ``seconds`` would be on an otherwise idle core."""
    heldout_accuracy: float | None = None
    """Held-out accuracy when the target was reached."""

    @property
    def steps(self) -> int | None:
        """Optimizer steps to the target (None unless reached)."""
        return len(self.losses) if self.status == "reached" else None


def train_to_target(
    task: SplitTask,
    global_batch_size: int,
    lr: float,
    *,
    target_loss: float,
    max_steps: int,
    micro_batch_size: int = 16,
    momentum: float = 0.9,
    watch: Callable[[int, nn.Module, float], Any] | None = None,
) -> Run:
    """Train ``micro_batch_size x accum_steps = global_batch_size`` with SGD through the Accumulator.

    After every optimizer step the loss over the whole training part is evaluated (not timed); the run stops
    when it is ``<= target_loss``, non-finite or above twice its first value, or after ``max_steps`` steps.
    ``watch(step, model, loss)`` is called after each evaluation (``step`` counts from 1).
    """
    model = task.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    acc = Accumulator(
        model, optimizer, BatchPlan(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size)
    )
    loss_fn = nn.functional.cross_entropy
    run = Run(global_batch_size=global_batch_size, lr=lr)
    for step in range(max_steps):
        inputs, targets = task.batches(step, global_batch_size)
        started, cpu = time.perf_counter(), time.process_time()
        for x, y in zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True):
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
        run.seconds += time.perf_counter() - started
        run.cpu_seconds += time.process_time() - cpu
        assert acc.stepped and acc.last_step is not None
        run.step_losses.append(acc.last_step.loss)
        with torch.no_grad():
            loss = float(loss_fn(model(task.train[0]), task.train[1]))
        run.losses.append(loss)
        if watch is not None:
            watch(step + 1, model, loss)
        if acc.last_step.skipped or not math.isfinite(loss) or loss > 2 * run.losses[0]:
            run.status = "diverged"
            break
        if loss <= target_loss:
            run.status = "reached"
            with torch.no_grad():
                predicted = model(task.heldout[0]).argmax(dim=1)
            run.heldout_accuracy = float((predicted == task.heldout[1]).to(torch.float64).mean())
            break
    return run


def sweep(
    tasks: Sequence[SplitTask],
    batch_sizes: Sequence[int],
    *,
    target_loss: float,
    max_samples: int,
    lr_start: float,
    lr_count: int = 7,
    lr_factor: float = 2**0.5,
    max_extra: int = 3,
    micro_batch_size: int = 16,
    momentum: float = 0.9,
    log: Callable[[str], Any] = lambda line: None,
) -> list[dict[str, Any]]:
    """Per batch size (ascending): the learning rate of the fewest steps to the target, summed over ``tasks``
    (seeds), on the grid ``lr_start x lr_factor^k``.

    The first batch size tries ``lr_count`` grid values centred on ``lr_start``; each next one centres on the
    previous best moved up by the square-root scaling rule (``log_lr_factor(sqrt(B / B_previous))`` grid steps;
    the window also reaches the linear rule). While the best sits at the window's edge, up to ``max_extra``
    more grid values are tried beyond it. Learning rates go out from the centre; each is stopped once its
    steps over the seeds pass the best total so far (it cannot win), and each run at ``max_samples``.

    Returns:
        One dict per batch size: ``global_batch_size``, ``accum_steps``, ``best`` (the winning learning rate's
        :class:`Run` per task, or None if none reached the target on every task), ``lr_at_grid_edge`` and
        ``tried`` (``lr``, ``status`` of its last run, mean ``steps`` or None, per learning rate).
    """
    points: list[dict[str, Any]] = []
    centre, previous = 0, None
    train = {"target_loss": target_loss, "micro_batch_size": micro_batch_size, "momentum": momentum}
    for size in sorted(batch_sizes):
        if previous is not None:
            centre += round(math.log(math.sqrt(size / previous), lr_factor))
        half, cap = lr_count // 2, max(1, max_samples // size)
        trials: dict[int, list[Run]] = {}
        for k in sorted(range(centre - half, centre - half + lr_count), key=lambda k: (abs(k - centre), k)):
            trials[k] = _trial(tasks, size, lr_start * lr_factor**k, trials, cap, train)
        for _ in range(max_extra):
            best_k = _best(trials, len(tasks))
            if best_k is None or min(trials) < best_k < max(trials):
                break
            k = best_k - 1 if best_k == min(trials) else best_k + 1
            trials[k] = _trial(tasks, size, lr_start * lr_factor**k, trials, cap, train)
        best_k = _best(trials, len(tasks))
        centre, previous = (centre if best_k is None else best_k), size
        best = None if best_k is None else trials[best_k]
        tried = []
        for _, runs in sorted(trials.items()):
            mean = _mean_steps(runs, len(tasks))
            status = "reached" if mean is not None else "cut" if runs[-1].steps else runs[-1].status
            tried.append({"lr": runs[0].lr, "status": status, "steps": mean})
        point = {"global_batch_size": size, "accum_steps": size // micro_batch_size, "best": best, "tried": tried}
        points.append(point | {"lr_at_grid_edge": best_k in (min(trials), max(trials))})
        mean = None if best is None else _mean_steps(best, len(tasks))
        log(f"B {size:>5}: lr {best[0].lr:.4g}, {mean:.1f} steps" if best else f"B {size:>5}: none reached the target")
    return points


def _mean_steps(runs: list[Run], count: int) -> float | None:
    """Mean steps to the target over ``count`` tasks (None unless every task's run reached it)."""
    steps = [run.steps for run in runs if run.steps is not None]
    return sum(steps) / count if len(steps) == count else None


def _best(trials: dict[int, list[Run]], count: int) -> int | None:
    """Grid index of the fewest steps to the target (the first tried among equals); None if none reached it."""
    reached = {k: mean for k, runs in trials.items() if (mean := _mean_steps(runs, count)) is not None}
    return min(reached, key=lambda k: reached[k]) if reached else None


def _trial(
    tasks: Sequence[SplitTask], size: int, lr: float, trials: dict[int, list[Run]], cap: int, train: Any
) -> list[Run]:
    """One learning rate on every task in turn, until one misses the target or its steps pass the best's total."""
    best_k = _best(trials, len(tasks))
    best = None if best_k is None else sum(len(run.losses) for run in trials[best_k])
    runs: list[Run] = []
    for task in tasks:
        used = sum(len(run.losses) for run in runs)
        limit = cap if best is None else min(cap, best - used)
        if limit < 1:
            break
        runs.append(train_to_target(task, size, lr, max_steps=limit, **train))
        if runs[-1].steps is None:
            break
    return runs


def fit_tradeoff(batch_sizes: Sequence[float], steps: Sequence[float]) -> dict[str, float | None]:
    """Fit ``S = S_min (1 + B_crit / B)`` (so ``E = B S = E_min (1 + B / B_crit)``) to measured steps ``S``.

    ``S = S_min + E_min / B`` is linear in ``(S_min, E_min)``; least squares on relative residuals
    ``(S - S_min - E_min / B) / S`` (the same as on ``E``) keeps the many-step small batches from dominating.
    Closed form in float64, no scipy.

    Returns:
        ``s_min``, ``e_min``, ``b_crit = e_min / s_min`` (None unless both are positive) and ``rms_relative_error``.

    Raises:
        ValueError: fewer than 2 distinct batch sizes, or lengths that differ.

    Example:
        >>> fit = fit_tradeoff([16, 64, 256], [100 * (1 + 50 / b) for b in (16, 64, 256)])
        >>> round(fit["s_min"], 6), round(fit["e_min"], 6), round(fit["b_crit"], 6)
        (100.0, 5000.0, 50.0)
    """
    if len(batch_sizes) != len(steps) or len(set(batch_sizes)) < 2:
        raise ValueError(f"the fit needs steps for at least 2 distinct batch sizes, got {list(batch_sizes)}")
    size = torch.tensor(batch_sizes, dtype=torch.float64)
    measured = torch.tensor(steps, dtype=torch.float64)
    design = torch.stack([1 / measured, 1 / (size * measured)], dim=1)
    solution = torch.linalg.lstsq(design, torch.ones_like(measured).unsqueeze(1), driver="gelsd").solution
    s_min, e_min = (float(value) for value in solution.squeeze(1))
    rms = float((design @ solution.squeeze(1) - 1).square().mean().sqrt())
    b_crit = e_min / s_min if s_min > 0 and e_min > 0 else None
    return {"s_min": s_min, "e_min": e_min, "b_crit": b_crit, "rms_relative_error": rms}


def noise_along(task: SplitTask, run: Run, levels: Sequence[float], **train: Any) -> list[dict[str, float]]:
    """:func:`brute_force_noise_scale` on the training part at the start of ``run``'s configuration and where its
    loss first falls to each of ``levels`` (``run`` is trained again, identically, with the same ``train`` options).
    """
    x, y = task.train
    fn = nn.functional.cross_entropy
    start = task.make_model()
    with torch.no_grad():
        points = [{"step": 0, "loss": float(fn(start(x), y)), **brute_force_noise_scale(start, x, y, fn)}]
    pending = sorted(levels, reverse=True)

    def watch(step: int, model: nn.Module, loss: float) -> None:
        if pending and loss <= pending[0]:
            del pending[: sum(loss <= level for level in pending)]
            points.append({"step": step, "loss": loss, **brute_force_noise_scale(model, x, y, fn)})

    train_to_target(task, run.global_batch_size, run.lr, max_steps=len(run.losses), watch=watch, **train)
    return points


def save(summary: dict[str, Any], directory: str | Path, *, title: str = "") -> None:
    """Write ``tradeoff.json``, ``tradeoff.csv`` and ``tradeoff.png`` (needs matplotlib) into ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tradeoff.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(folder / "tradeoff.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows([point[column] for column in CSV_COLUMNS] for point in summary["points"] if point["steps"])
    plot(summary, folder / "tradeoff.png", title=title)


def summarize(points: Sequence[dict[str, Any]], noise: Sequence[dict[str, float]], **config: Any) -> dict[str, Any]:
    """The JSON-ready result: the configuration, one row per batch size, the fit and the noise scale."""
    rows = []
    for point in points:
        runs: list[Run] | None = point["best"]
        row = {key: value for key, value in point.items() if key != "best"}
        if runs is None:
            row |= dict.fromkeys([*CSV_COLUMNS[2:], "final_train_loss"])
        else:
            steps = [run.steps or 0 for run in runs]
            mean = sum(steps) / len(steps)
            row |= {
                "lr": runs[0].lr,
                "steps": mean,
                "samples": mean * point["global_batch_size"],
                "seconds": sum(run.seconds for run in runs) / len(runs),
                "cpu_seconds": sum(run.cpu_seconds for run in runs) / len(runs),
                "heldout_accuracy": sum(run.heldout_accuracy or 0 for run in runs) / len(runs),
                "final_train_loss": max(run.losses[-1] for run in runs),
                "steps_per_seed": steps,
            }
        rows.append(row)
    done = [row for row in rows if row["steps"]]
    fit = fit_tradeoff([r["global_batch_size"] for r in done], [r["steps"] for r in done]) if len(done) > 1 else None
    return {"config": config, "points": rows, "fit": fit, "noise_scale": list(noise)}


def plot(summary: dict[str, Any], path: str | Path, *, title: str = "") -> None:
    """Samples against steps to the target (log-log), one point per batch size, with the fitted hyperbola."""
    require("matplotlib", "plot").use("Agg")
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axes = pyplot.subplots(figsize=(8, 5.5), dpi=120)
    done = [p for p in summary["points"] if p["steps"]]
    axes.plot([p["steps"] for p in done], [p["samples"] for p in done], "o", color="C0", label="measured", zorder=3)
    for p in done:
        micro = p["global_batch_size"] // p["accum_steps"]
        label = f"B {p['global_batch_size']} = {micro} x {p['accum_steps']}\nlr {p['lr']:.3g}"
        axes.annotate(label, (p["steps"], p["samples"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    fit = summary["fit"]
    if fit and fit["b_crit"]:
        s_min, e_min, b_crit = fit["s_min"], fit["e_min"], fit["b_crit"]
        sizes = [b_crit * 2 ** (k / 8) for k in range(-80, 81)]
        axes.plot([s_min * (1 + b_crit / b) for b in sizes], [e_min * (1 + b / b_crit) for b in sizes], color="C1",
                  label=f"fit (S/S_min - 1)(E/E_min - 1) = 1: S_min {s_min:.3g}, E_min {e_min:.4g}")  # fmt: skip
        axes.axvline(s_min, color="C1", linestyle=":", linewidth=1)
        axes.axhline(e_min, color="C1", linestyle=":", linewidth=1)
        axes.plot([2 * s_min], [2 * e_min], "*", color="C3", markersize=14, zorder=4,
                  label=f"B_crit = E_min / S_min = {b_crit:.3g} (2 S_min, 2 E_min)")  # fmt: skip
        at_target = summary["noise_scale"][-1]["b_simple"] if summary["noise_scale"] else math.inf
        if math.isfinite(at_target) and at_target > 0:
            point = (s_min * (1 + b_crit / at_target), e_min * (1 + at_target / b_crit))
            label = f"B = B_simple at the target (brute force), {at_target:.3g}"
            axes.plot(*point, "D", color="C2", zorder=4, label=label)
        axes.set_xlim(0.5 * s_min, 2 * max(p["steps"] for p in done))
        axes.set_ylim(0.5 * e_min, 2 * max(p["samples"] for p in done))
    axes.set(xscale="log", yscale="log", title=title or "steps vs samples to the target")
    axes.set(xlabel="optimizer steps to the target training loss", ylabel="samples to the target training loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    figure.savefig(path, bbox_inches="tight")
    pyplot.close(figure)
