"""The gradient noise scale measured by the Accumulator at fixed weights, and the brute-force value it estimates
(tests/unit/test_noise.py; also on 2 gloo ranks under ``tests.helpers.spawn.run_ranks``)."""

from __future__ import annotations

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from distaccum.tools.survey.noise import brute_force_noise_scale, sampled_noise_scale
from tests.helpers.common import make_model

POPULATION = 512


def population() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(POPULATION, 8, generator=generator, dtype=torch.float64)
    targets = torch.randn(POPULATION, 4, generator=generator, dtype=torch.float64) + 0.5  # B_simple ~ 11
    return inputs, targets


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().sum(dim=1)


def brute_force() -> float:
    """B_simple = tr(Sigma) / |G|^2 of the population as micro-batches sample it (with replacement), from every
    per-sample gradient (no estimator)."""
    inputs, targets = population()
    exact = brute_force_noise_scale(
        make_model(torch.float64), inputs, targets, lambda output, target: (output - target).square().sum(dim=1).mean()
    )
    return sampled_noise_scale(exact, POPULATION)


def measure(rank: int, world_size: int, windows: int, micro: int, accum: int, decay: float) -> list[float | None]:
    """Train at learning rate 0 (weights fixed) on micro-batches drawn with replacement; the estimates per step."""
    inner = make_model(torch.float64)
    model = nn.parallel.DistributedDataParallel(inner) if world_size > 1 else inner
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = BatchPlan(micro_batch_size=micro, accum_steps=accum, world_size=world_size)
    acc = Accumulator(model, optimizer, plan, noise_scale=decay)
    inputs, targets = population()
    generator = torch.Generator().manual_seed(100 + rank)
    estimates = []
    for _ in range(windows * accum):
        index = torch.randint(0, POPULATION, (micro,), generator=generator)
        with acc.micro_step():
            acc.backward(per_sample_loss(model, inputs[index], targets[index]).mean())
        if acc.stepped:
            assert acc.last_step is not None
            estimates.append(acc.last_step.noise_scale)
    return estimates
