"""The Accumulator's gradient noise scale on scikit-learn's digits against the brute-force value (issue 16, part 1):
every per-sample gradient of the 1797 digits at fixed weights (``distaccum.tools.survey.noise``), where the
estimate comes from one micro-batch gradient and the step's gradient per window, smoothed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from distaccum.tools.survey.data import digits_data, digits_task
from distaccum.tools.survey.noise import brute_force_noise_scale, sampled_noise_scale

pytest.importorskip("sklearn", reason="the digits come from scikit-learn (pip install 'distaccum[survey]')")


def _with_replacement_value(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    exact = brute_force_noise_scale(model, inputs, targets, nn.functional.cross_entropy)
    return sampled_noise_scale(exact, inputs.shape[0])


def _estimates(model, inputs, targets, micro, accum, windows, decay, seed):
    plan = BatchPlan(micro_batch_size=micro, accum_steps=accum, world_size=1)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), plan, noise_scale=decay)  # weights fixed
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(windows * accum):
        index = torch.randint(0, inputs.shape[0], (micro,), generator=generator)
        with acc.micro_step():
            acc.backward(nn.functional.cross_entropy(model(inputs[index]), targets[index]))
        if acc.stepped:
            values.append(acc.last_step.noise_scale)
    return values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_scale_at_initialization_matches_brute_force(seed):
    make_model, _ = digits_task(dtype=torch.float64)
    inputs, targets = digits_data(torch.float64)
    exact = _with_replacement_value(make_model(), inputs, targets)  # ~73 samples
    estimate = _estimates(make_model(), inputs, targets, micro=16, accum=8, windows=300, decay=0.995, seed=seed)[-1]
    assert abs(estimate / exact - 1) <= 0.05, (estimate, exact)  # measured: within 2.1% for seeds 0-2


def test_noise_scale_after_training_needs_a_window_near_it():
    make_model, _ = digits_task(dtype=torch.float64)
    inputs, targets = digits_data(torch.float64)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):  # training loss 1.7 -> 0.12: the gradient shrinks, the noise scale grows ~8x
        index = torch.randint(0, inputs.shape[0], (128,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[index]), targets[index]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # else the last training gradient would join the first window's
    exact = _with_replacement_value(model, inputs, targets)  # ~615 samples
    # A window of 1024 samples (16 x 64), above the noise scale: the last 50 smoothed estimates average within 15%.
    values = _estimates(model, inputs, targets, micro=16, accum=64, windows=300, decay=0.99, seed=0)
    assert abs(sum(values[-50:]) / 50 / exact - 1) <= 0.15, (values[-50:], exact)
