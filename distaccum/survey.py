"""Learning-rate survey: the real batch, the equivalent virtual batch and a small batch, side by side.

Each configuration trains a copy of the same initial model on the same sample stream while the learning rate
rises exponentially, once per optimizer step, and the window loss is recorded against the learning rate. A
virtual batch (``micro_batch_size x accum_steps x world_size``) that is really equal to the real batch lies
on the real batch's curve; a small batch usually gets unstable at another learning rate. ``distaccum survey``
runs it on scikit-learn's handwritten digits; :func:`lr_survey` runs it on any model.

Commands::

    distaccum survey --out survey-out
    torchrun --nproc_per_node 2 -m distaccum survey --out survey-out
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import dist
from distaccum.engine import Accumulator
from distaccum.plan import BatchPlan

Batch = tuple[torch.Tensor, torch.Tensor]
BatchFn = Callable[[int, int], Batch]
"""``batches(step, global_batch_size) -> (inputs, targets)``: the whole global batch of an optimizer step."""
CSV_COLUMNS = ("config", "step", "lr", "loss")


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the survey needs {module} for this; install it with: pip install 'distaccum[{extra}]'"
        ) from error


@dataclass(frozen=True, kw_only=True)
class SurveyConfig:
    """One batch configuration of a survey: ``global_batch_size`` alone, or two of the three sizes.

    With ``global_batch_size`` alone the configuration is a real batch: one micro-batch of
    ``global_batch_size / world_size`` per rank and no accumulation. Otherwise the missing size is derived for
    the live world size, as :class:`~distaccum.BatchPlan` does.

    Example:
        >>> SurveyConfig(name="virtual", global_batch_size=256, micro_batch_size=16).plan(world_size=2).accum_steps
        8
    """

    name: str
    """Label in the CSV, the plot and the summary (unique within a survey)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks."""
    micro_batch_size: int | None = None
    """Samples per forward/backward on one rank."""
    accum_steps: int | None = None
    """Micro-batches per optimizer step on each rank."""

    def __post_init__(self) -> None:
        if not self.name or "," in self.name:
            raise ValueError(f"SurveyConfig.name must be a non-empty label without commas, got {self.name!r}")
        if self.global_batch_size is None and (self.micro_batch_size is None or self.accum_steps is None):
            raise ValueError(
                f"SurveyConfig {self.name!r} needs global_batch_size, or micro_batch_size and accum_steps; "
                f"got micro_batch_size={self.micro_batch_size}, accum_steps={self.accum_steps}"
            )

    def plan(self, world_size: int) -> BatchPlan:
        """The batch plan of this configuration on ``world_size`` ranks (raises ``ValueError`` if impossible)."""
        if self.global_batch_size is not None and self.micro_batch_size is None and self.accum_steps is None:
            return BatchPlan(global_batch_size=self.global_batch_size, accum_steps=1, world_size=world_size)
        return BatchPlan(
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            accum_steps=self.accum_steps,
            world_size=world_size,
        )


def default_configs(global_batch_size: int, micro_batch_size: int) -> list[SurveyConfig]:
    """The survey's classic trio: ``real``, ``virtual`` and ``small``.

    Args:
        global_batch_size: B, the real batch: one micro-batch per rank, no accumulation.
        micro_batch_size: b, the virtual batch's micro-batch (``accum_steps = B / (b x world_size)``) and the
            small batch's global size (b over all ranks, no accumulation).
    """
    return [
        SurveyConfig(name="real", global_batch_size=global_batch_size),
        SurveyConfig(name="virtual", global_batch_size=global_batch_size, micro_batch_size=micro_batch_size),
        SurveyConfig(name="small", global_batch_size=micro_batch_size),
    ]


@dataclass
class Curve:
    """One configuration's record: learning rate and window loss per optimizer step, until divergence."""

    name: str
    plan: BatchPlan
    steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def smoothed(losses: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average of ``losses`` (``smoothing=0``: the losses themselves)."""
    average, result = 0.0, []
    for index, loss in enumerate(losses):
        average = smoothing * average + (1 - smoothing) * loss
        result.append(average / (1 - smoothing ** (index + 1)))
    return result


def divergence_step(losses: Sequence[float], factor: float, smoothing: float = 0.0) -> int | None:
    """Index of the first loss whose smoothed value is non-finite or above ``factor`` x the smoothed minimum so far.

    Smoothing matters once the loss nears zero: a raw loss of 0.09 after a minimum of 0.02 is noise, not
    divergence, yet it is 4x the minimum.
    """
    best = math.inf
    for index, value in enumerate(smoothed(losses, smoothing)):
        best = min(best, value)
        if not math.isfinite(value) or value > factor * best:
            return index
    return None


def stream_batches(inputs: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> BatchFn:
    """Cut a dataset into one endless sample stream (a fresh seeded shuffle per epoch).

    Optimizer step ``s`` of a configuration with global batch ``G`` gets stream samples ``[s*G, (s+1)*G)``:
    configurations with the same global batch see exactly the same samples at every step.

    Args:
        inputs: all samples' inputs (first dimension: samples).
        targets: all samples' targets, in the same order.
        seed: seeds the shuffle of every epoch.

    Returns:
        ``batches(step, global_batch_size) -> (inputs, targets)``, a pure function of its arguments.

    Example:
        >>> batches = stream_batches(torch.arange(10.0), torch.arange(10))
        >>> torch.equal(batches(1, 4)[0], torch.cat([batches(2, 2)[0], batches(3, 2)[0]]))
        True
    """
    count = inputs.shape[0]

    def batches(step: int, global_batch_size: int) -> Batch:
        start = step * global_batch_size
        first_epoch, last_epoch = start // count, (start + global_batch_size - 1) // count
        orders = [
            torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            for epoch in range(first_epoch, last_epoch + 1)
        ]
        offset = start - first_epoch * count
        index = torch.cat(orders)[offset : offset + global_batch_size]
        return inputs[index], targets[index]

    return batches


def _run_config(
    config: SurveyConfig,
    base: nn.Module,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: BatchFn,
    lr_values: Sequence[float],
    factor: float,
    smoothing: float,
    device: torch.device,
    tick: Callable[[int], Any],
) -> Curve:
    world, rank = dist.world_size(), dist.rank()
    plan = config.plan(world)
    model: nn.Module = copy.deepcopy(base).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model.parameters())
    for group in optimizer.param_groups:
        group["lr"] = lr_values[0]
    # The scheduler (stepped by the Accumulator once per optimizer step) owns the schedule, as in training.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_values[min(step, len(lr_values) - 1)] / lr_values[0]
    )
    acc = Accumulator(model, optimizer, plan, scheduler=scheduler)
    curve = Curve(name=config.name, plan=plan)
    per_rank = plan.global_batch_size // world
    for step in range(len(lr_values)):
        lr = float(optimizer.param_groups[0]["lr"])
        inputs, targets = batches(step, plan.global_batch_size)
        if inputs.shape[0] != plan.global_batch_size:
            raise ValueError(
                f"batches({step}, {plan.global_batch_size}) returned {inputs.shape[0]} samples; it must return "
                "exactly global_batch_size samples"
            )
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        micro_batches = zip(
            inputs[mine].split(plan.micro_batch_size), targets[mine].split(plan.micro_batch_size), strict=True
        )
        for x, y in micro_batches:
            with acc.micro_step():
                acc.backward(loss_fn(model(x.to(device)), y.to(device)))
        assert acc.stepped and acc.last_step is not None
        curve.steps.append(step)
        curve.lrs.append(lr)
        # last_step is identical on every rank, so every rank stops at the same step: nothing can hang.
        curve.losses.append(math.inf if acc.last_step.skipped else acc.last_step.loss)
        tick(1)
        if divergence_step(curve.losses, factor, smoothing) is not None:
            tick(len(lr_values) - step - 1)
            break
    return curve


def lr_survey(
    model: nn.Module | Callable[[], nn.Module],
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: BatchFn,
    configs: Sequence[SurveyConfig],
    *,
    lr_min: float,
    lr_max: float,
    steps: int,
    divergence_factor: float = 4.0,
    smoothing: float = 0.9,
    seed: int = 0,
    progress: bool = False,
) -> SurveyResult:
    """Train every configuration from the same initial weights with an exponentially rising learning rate.

    Works on one process and on every rank of a ``torch.distributed`` job (the model is wrapped in DDP when
    there are several ranks; call :func:`distaccum.dist.init` first). Nothing of ``model`` is changed: each
    configuration trains a deep copy. The learning rate of step ``s`` is ``lr_min * (lr_max/lr_min) **
    (s/(steps-1))``, set by a ``LambdaLR`` scheduler that the :class:`~distaccum.Accumulator` steps once per
    optimizer step. A curve stops at the first step whose loss, smoothed by an exponential moving average,
    is non-finite or above ``divergence_factor`` times its smoothed minimum so far (:func:`divergence_step`);
    that step is recorded. The recorded losses are the raw ``acc.last_step.loss`` (the window loss over
    all ranks, identical on every rank, so every rank stops at the same step).

    Args:
        model: a module (deep-copied) or a factory returning one; must be identical on every rank.
        make_optimizer: ``params -> optimizer``; its learning rate is overridden by the schedule.
        loss_fn: ``(outputs, targets) -> scalar mean loss``.
        batches: ``(step, global_batch_size) -> (inputs, targets)``, the global batch of an optimizer step,
            the same on every rank (see :func:`stream_batches`).
        configs: the configurations, with unique names.
        lr_min: learning rate of the first step.
        lr_max: learning rate of the last step.
        steps: optimizer steps per configuration (at least 2).
        divergence_factor: stop a curve when its (smoothed) loss exceeds this multiple of its minimum.
        smoothing: EMA coefficient of the stop rule, in ``[0, 1)``; 0 compares raw losses.
        seed: ``torch.manual_seed`` before each configuration (dropout and the like start alike).
        progress: show a tqdm progress bar on rank 0.

    Returns:
        A :class:`SurveyResult`: one :class:`Curve` per configuration, in order, identical on every rank.

    Raises:
        ValueError: bad range, steps, factor, duplicate names, or a configuration that does not fit the
            world size.
        ImportError: ``progress=True`` without tqdm.

    Example:
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> result = lr_survey(
        ...     lambda: nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.0), nn.functional.mse_loss,
        ...     stream_batches(x, y), default_configs(16, 4), lr_min=1e-3, lr_max=1e-1, steps=5)
        >>> [len(curve.losses) for curve in result.curves]
        [5, 5, 5]
        >>> result.summary()["pairs"][0]["max_relative_distance"] < 1e-6
        True
    """
    if not (0 < lr_min < lr_max and math.isfinite(lr_max)):
        raise ValueError(f"need 0 < lr_min < lr_max, got lr_min={lr_min}, lr_max={lr_max}; e.g. lr_min=1e-4, lr_max=1")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (a range needs two ends), got {steps}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor}; e.g. 4.0")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}; e.g. 0.9, or 0 for raw losses")
    names = [config.name for config in configs]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"configs need unique names and at least one configuration, got {names}")
    world = dist.world_size()
    if world > 1 and not dist.is_initialized():
        raise ValueError(f"WORLD_SIZE is {world} but no process group is initialized; call distaccum.dist.init() first")
    for config in configs:
        config.plan(world)  # a configuration that does not fit fails on every rank before any training
    ratio = lr_max / lr_min
    lr_values = [lr_min * ratio ** (step / (steps - 1)) for step in range(steps)]
    base = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    bar = None
    if progress and dist.rank() == 0:
        tqdm = _require("tqdm", "survey").tqdm
        bar = tqdm(total=steps * len(configs), desc="lr survey", unit="step")
    tick: Callable[[int], Any] = bar.update if bar is not None else (lambda count: None)
    curves = []
    try:
        for config in configs:
            torch.manual_seed(seed)
            if bar is not None:
                bar.set_postfix_str(config.name)
            curves.append(
                _run_config(
                    config,
                    base,
                    make_optimizer,
                    loss_fn,
                    batches,
                    lr_values,
                    divergence_factor,
                    smoothing,
                    dist.device(),
                    tick,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    return SurveyResult(curves=curves, divergence_factor=divergence_factor, smoothing=smoothing)


# ------------------------------------------------------------------------------------------------ summary
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
    matplotlib = _require("matplotlib", "plot")
    matplotlib.use("Agg")  # files only: never open a window, works without a display
    pyplot = _require("matplotlib.pyplot", "plot")
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


# -------------------------------------------------------------------------------------------- built-in task
def digits_task(
    seed: int = 0, hidden: int = 64, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], nn.Module], BatchFn]:
    """scikit-learn's handwritten digits (1797 x 64, 10 classes, standardized) and a small MLP factory.

    Returns:
        ``(make_model, batches)``: an MLP 64-hidden-hidden-10 factory seeded by ``seed`` and the digits as a
        :func:`stream_batches` stream.

    Raises:
        ImportError: scikit-learn is missing (the message names the pip command).
    """
    datasets = _require("sklearn.datasets", "survey")
    digits = datasets.load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float64)
    std = inputs.std(dim=0)
    inputs = ((inputs - inputs.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))).to(dtype)
    targets = torch.tensor(digits.target, dtype=torch.int64)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        ).to(dtype)

    return make_model, stream_batches(inputs, targets, seed=seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distaccum survey``."""
    option = parser.add_argument
    option("--global-batch-size", "-B", type=int, default=256, help="the real batch B (default: %(default)s)")
    option("--micro-batch-size", "-b", type=int, default=16, help="micro and small batch b (default: %(default)s)")
    option("--lr-min", type=float, default=1e-3, help="learning rate of the first step (default: %(default)s)")
    option("--lr-max", type=float, default=10.0, help="learning rate of the last step (default: %(default)s)")
    option("--steps", type=int, default=300, help="optimizer steps per configuration (default: %(default)s)")
    option("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    option("--hidden", type=int, default=64, help="MLP hidden width (default: %(default)s)")
    dtype_help = "model and data dtype; float64 shows the equality beyond float32 rounding (default: %(default)s)"
    option("--dtype", choices=("float32", "float64"), default="float64", help=dtype_help)
    option("--divergence-factor", type=float, default=4.0, help="stop at loss > factor x min (default: %(default)s)")
    option("--smoothing", type=float, default=0.9, help="EMA of the stop rule, 0 = raw (default: %(default)s)")
    option("--threads", type=int, default=1, help="torch intra-op threads per process (default: %(default)s)")
    option("--seed", type=int, default=0, help="initial weights and sample order (default: %(default)s)")
    option("--out", type=Path, default=None, help="write survey.csv, survey.png and summary.json to this folder")
    option("--no-progress", action="store_true", help="no progress bar")


def _print_summary(summary: dict[str, Any], seconds: float) -> None:
    def number(value: float | None) -> str:
        return "none" if value is None else f"{value:.4g}"

    dist.print0(f"lr survey: {seconds:.1f} s")
    for name, figures in summary["configs"].items():
        dist.print0(
            f"  {name:>8} {figures['micro_batch_size']} x {figures['accum_steps']} x {figures['world_size']} = "
            f"{figures['global_batch_size']}: min loss {number(figures['min_loss'])} at lr "
            f"{number(figures['lr_at_min_loss'])}, diverged at lr {number(figures['lr_at_divergence'])}"
        )
    for pair in summary["pairs"]:
        dist.print0(
            f"  max |{pair['b']} - {pair['a']}| / {pair['a']} over the {pair['steps_compared']} steps before "
            f"divergence: {number(pair['max_relative_distance'])}"
        )


def _main(args: argparse.Namespace) -> int:
    # The built-in MLP is too small to gain from intra-op threads, and on a busy machine they cost 10x or more.
    torch.set_num_threads(args.threads)
    make_model, batches = digits_task(args.seed, args.hidden, getattr(torch, args.dtype))
    started = time.perf_counter()
    result = lr_survey(
        make_model,
        lambda params: torch.optim.SGD(params, lr=args.lr_min, momentum=args.momentum),
        nn.functional.cross_entropy,
        batches,
        default_configs(args.global_batch_size, args.micro_batch_size),
        lr_min=args.lr_min,
        lr_max=args.lr_max,
        steps=args.steps,
        divergence_factor=args.divergence_factor,
        smoothing=args.smoothing,
        seed=args.seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    _print_summary(result.summary(), seconds)
    if args.out is not None and dist.rank() == 0:
        title = f"digits, MLP {args.hidden}-{args.hidden}, SGD momentum {args.momentum}, {args.dtype}"
        result.save(args.out, title=title)
        print(f"wrote survey.csv, survey.png, summary.json to {args.out}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``distaccum survey`` (on one process, or on every rank under torchrun); 2 on a bad option."""
    try:
        return dist.run(_main, args)
    except ValueError as error:
        # Every rank checks every configuration before training, so all ranks leave here together.
        print(f"distaccum survey: error: {error}", file=sys.stderr, flush=True)
        return 2
