"""What a survey reports: figures computed from the curves alone, ``survey.csv``, ``summary.json`` and the plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distaccum.tools.survey.curve import Curve, divergence_step
from distaccum.tools.survey.optional import require

CSV_COLUMNS = ("config", "step", "lr", "loss")


def rows(curves: Sequence[Curve]) -> list[tuple[str, int, float, float]]:
    """The curves as ``(config, step, lr, loss)`` rows."""
    return [(c.name, s, lr, loss) for c in curves for s, lr, loss in zip(c.steps, c.lrs, c.losses, strict=True)]


def summarize(curves: Sequence[Curve], divergence_factor: float = 4.0, smoothing: float = 0.9) -> dict[str, Any]:
    """Figures computed from the curves alone.

    For each configuration: the learning rate of the minimum loss, and the learning rate of the step where
    it diverged by :func:`divergence_step` (None if it never did). For each pair of configurations with the
    same global batch (they must coincide): the maximum of ``|loss_b - loss_a| / |loss_a|`` over the steps
    before either diverged. ``max_relative_distance`` is the largest of those (None without such a pair).

    Args:
        curves: the survey's curves.
        divergence_factor: the stop rule's factor (:func:`divergence_step`).
        smoothing: the stop rule's moving-average coefficient.

    Returns:
        A JSON-ready dict: ``divergence_factor``, ``smoothing``, ``max_relative_distance``, ``pairs`` (``a``,
        ``b``, ``steps_compared``, ``max_relative_distance``) and ``configs`` (per name: the plan's sizes,
        ``steps_recorded``, ``min_loss``, ``lr_at_min_loss``, ``lr_at_divergence``).
    """
    configs: dict[str, dict[str, Any]] = {}
    alive: dict[str, int] = {}
    for curve in curves:
        finite = [i for i, loss in enumerate(curve.losses) if math.isfinite(loss)]
        best = min(finite, key=lambda i: curve.losses[i]) if finite else None
        gone = divergence_step(curve.losses, divergence_factor, smoothing)
        alive[curve.name] = len(curve.losses) if gone is None else gone
        configs[curve.name] = {
            **curve.plan.as_dict(),
            "steps_recorded": len(curve.losses),
            "min_loss": None if best is None else curve.losses[best],
            "lr_at_min_loss": None if best is None else curve.lrs[best],
            "lr_at_divergence": None if gone is None else curve.lrs[gone],
        }
    pairs: list[dict[str, Any]] = []
    for i, a in enumerate(curves):
        for b in curves[i + 1 :]:
            if a.plan.global_batch_size != b.plan.global_batch_size:
                continue
            common = min(alive[a.name], alive[b.name])
            gaps = [_relative(b.losses[s], a.losses[s]) for s in range(common)]
            pairs.append(
                {"a": a.name, "b": b.name, "steps_compared": common, "max_relative_distance": max(gaps, default=None)}
            )
    distances = [p["max_relative_distance"] for p in pairs if p["max_relative_distance"] is not None]
    return {
        "divergence_factor": divergence_factor,
        "smoothing": smoothing,
        "max_relative_distance": max(distances, default=None),
        "pairs": pairs,
        "configs": configs,
    }


def _relative(value: float, reference: float) -> float:
    if value == reference:
        return 0.0
    return abs(value - reference) / abs(reference) if reference else math.inf


@dataclass(frozen=True)
class SurveyResult:
    """What :func:`lr_survey` returns: the curves and the stop rule they were cut with."""

    curves: list[Curve]
    divergence_factor: float
    smoothing: float

    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of the curves with this survey's stop rule."""
        return summarize(self.curves, self.divergence_factor, self.smoothing)

    def save(self, directory: str | Path, *, title: str = "") -> None:
        """Write ``survey.csv``, ``summary.json`` and ``survey.png`` (needs matplotlib) into ``directory``."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(self.curves, folder / "survey.csv")
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        plot(self.curves, folder / "survey.png", title=title)


def write_csv(curves: Sequence[Curve], path: str | Path) -> None:
    """Write ``config,step,lr,loss`` rows (full float precision)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows((name, step, repr(lr), repr(loss)) for name, step, lr, loss in rows(curves))


def plot(curves: Sequence[Curve], path: str | Path, *, title: str = "") -> None:
    """Loss against learning rate (log x axis), one line per configuration, written to ``path`` (PNG).

    When several configurations share a global batch, the first is drawn as a thick translucent band and the
    others as thin dashed lines with markers on top of it, so a virtual batch that equals the real batch
    shows as a dashed line running inside the band. The y axis is cut at 1.3x the highest first-step loss:
    a diverging curve leaves the top of the plot instead of flattening all the others.

    Raises:
        ImportError: matplotlib is missing (the message names the pip command).
    """
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")  # files only: never open a window, works without a display
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axes = pyplot.subplots(figsize=(8, 5), dpi=120)
    group_sizes: dict[int, int] = {}
    for curve in curves:
        group_sizes[curve.plan.global_batch_size] = group_sizes.get(curve.plan.global_batch_size, 0) + 1
    drawn: dict[int, int] = {}
    for curve in curves:
        plan = curve.plan
        layer = drawn.get(plan.global_batch_size, 0)
        drawn[plan.global_batch_size] = layer + 1
        style: dict[str, Any] = {"linewidth": 1.3}
        if group_sizes[plan.global_batch_size] > 1:
            style = (
                {"linewidth": 7, "alpha": 0.4, "solid_capstyle": "round"}
                if layer == 0
                else {"linewidth": 1.5, "linestyle": "--", "marker": "o", "markersize": 2.5}
            )
        label = (
            f"{curve.name}: {plan.micro_batch_size} x {plan.accum_steps} x {plan.world_size} = {plan.global_batch_size}"
        )
        points = [(lr, loss) for lr, loss in zip(curve.lrs, curve.losses, strict=True) if math.isfinite(loss)]
        axes.plot([p[0] for p in points], [p[1] for p in points], label=label, zorder=2 + layer, **style)
    first_losses = [c.losses[0] for c in curves if c.losses and math.isfinite(c.losses[0])]
    if first_losses:
        axes.set_ylim(0, 1.3 * max(first_losses))
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (rises exponentially, one value per optimizer step)")
    axes.set_ylabel("training loss of the step's batch")
    axes.set_title(title or "learning-rate survey")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="micro x accum x world = global batch")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
