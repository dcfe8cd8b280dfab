"""The survey run: batch configurations (:class:`SurveyConfig`) and :func:`lr_survey`, which trains each one."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, dist
from distaccum.tools.survey.curve import Curve, divergence_step
from distaccum.tools.survey.data import BatchFn
from distaccum.tools.survey.optional import require
from distaccum.tools.survey.report import SurveyResult


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
    # A real batch (no accumulation) is trained by a plain PyTorch loop, so that the curve the virtual batch is
    # compared with does not go through the code under test.
    acc = Accumulator(model, optimizer, plan, scheduler=scheduler) if plan.accum_steps > 1 else None
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
        if acc is None:
            loss = _plain_step(model, optimizer, scheduler, loss_fn, *next(micro_batches), device, world)
        else:
            for x, y in micro_batches:
                with acc.micro_step():
                    acc.backward(loss_fn(model(x.to(device)), y.to(device)))
            assert acc.stepped and acc.last_step is not None
            loss = math.inf if acc.last_step.skipped else acc.last_step.loss
        curve.steps.append(step)
        curve.lrs.append(lr)
        # The loss is the mean over all ranks, identical on every rank: every rank stops at the same step.
        curve.losses.append(loss)
        tick(1)
        if divergence_step(curve.losses, factor, smoothing) is not None:
            tick(len(lr_values) - step - 1)
            break
    return curve


def _plain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    world: int,
) -> float:
    """One optimizer step on this rank's whole share of a real batch, as any PyTorch script takes it."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x.to(device)), y.to(device))
    loss.backward()
    optimizer.step()
    scheduler.step()
    value = loss.detach().to(torch.float64).reshape(1)
    if world > 1:
        torch.distributed.all_reduce(value)
    return float(value) / world


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
    (s/(steps-1))``, set by a ``LambdaLR`` scheduler stepped once per optimizer step. A configuration with
    accumulation trains through the :class:`~distaccum.Accumulator`; a real batch (``accum_steps`` 1) trains in
    a plain PyTorch loop, so the curve it is compared with does not go through distaccum. A curve stops at the
    first step whose loss, smoothed by an exponential moving average, is non-finite or above
    ``divergence_factor`` times its smoothed minimum so far (:func:`divergence_step`); that step is recorded.
    The recorded losses are raw: the step's loss averaged over all ranks, identical on every rank, so every
    rank stops at the same step.

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
        >>> from distaccum.tools.survey import stream_batches
        >>> _ = torch.manual_seed(0)  # the same data and model whatever ran before (a curve may diverge early)
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
        tqdm = require("tqdm", "survey").tqdm
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
