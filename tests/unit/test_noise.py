"""The gradient noise scale (McCandlish et al. 2018, appendix A) measured by the Accumulator: the estimator's
arithmetic, and the estimate at fixed weights against the brute-force tr(Sigma) / |G|^2 of every per-sample
gradient, on one process and on 2 DDP ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from distaccum.noise import NoiseScale
from distaccum.tools.survey.noise import brute_force_noise_scale, sampled_noise_scale
from tests.helpers.common import loss_fn, make_model
from tests.helpers.spawn import run_ranks

# Per-rank bodies (run in spawned processes under tests.helpers.spawn.run_ranks, and on one process here)

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


def test_exact_expectations_give_the_exact_noise_scale():
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B: fed the expectations, the unbiased estimator returns tr / |G|^2 exactly.
    grad_sq, trace = 3.0, 45.0
    noise = NoiseScale(0.9)
    for _ in range(3):
        small_sq, big_sq = grad_sq + trace / 4, grad_sq + trace / 64
        value = noise.update([2 * small_sq, 2 * 4, 2], big_sq, 64)  # two ranks measured micro-batches of 4
    assert value == pytest.approx(trace / grad_sq, rel=1e-12)


def test_a_step_without_a_small_reading_leaves_the_estimate():
    noise = NoiseScale(0.5)
    assert noise.update([0.0, 0.0, 0.0], 1.0, 32) is None  # no rank measured: nothing known yet
    noise.update([13.0, 4.0, 1.0], 2.0, 32)
    before = noise.value
    assert before is not None and noise.update([0.0, 0.0, 0.0], 5.0, 32) == before
    assert noise.update([13.0, 4.0, 1.0], float("inf"), 32) == before  # a skipped, non-finite step teaches nothing


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2])
def test_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match=r"noise_scale must be an EMA decay in \[0, 1\)"):
        NoiseScale(decay)


def test_wrappers_without_window_gradients_in_param_grad_are_refused():
    with pytest.raises(ValueError, match=r"noise_scale=0.9 reads a micro-batch's gradient in param.grad.*fsdp2"):
        NoiseScale.checked(0.9, "fsdp2", grads_in_params=False)
    assert NoiseScale.checked(None, "fsdp2", grads_in_params=False) is None


def test_off_by_default_and_none_for_windows_of_one_micro_step():
    model = make_model()
    for accum, noise_scale, expected_none in ((4, None, True), (1, 0.9, True), (4, 0.9, False)):
        plan = BatchPlan(micro_batch_size=4, accum_steps=accum, world_size=1)
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), plan, noise_scale=noise_scale)
        for _ in range(2 * accum):
            with acc.micro_step():  # targets offset: a clear mean gradient, so |G|^2's estimate is positive
                acc.backward(loss_fn(model(torch.randn(4, 8)), torch.randn(4, 4) + 1))
        assert (acc.last_step.noise_scale is None) is expected_none, (accum, noise_scale)


def test_the_estimate_resumes_from_the_state():
    model = make_model()
    plan = BatchPlan(micro_batch_size=4, accum_steps=4, world_size=1)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), plan, noise_scale=0.9)
    for _ in range(8):
        with acc.micro_step():
            acc.backward(loss_fn(model(torch.randn(4, 8)), torch.randn(4, 4) + 1))
    resumed = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), plan, noise_scale=0.9)
    resumed.load_state_dict(acc.state_dict())
    assert resumed._window.noise.value == acc.last_step.noise_scale is not None


def test_the_estimate_at_fixed_weights_approaches_the_brute_force_noise_scale():
    exact = brute_force()  # ~11.5 samples: between the micro-batch (4) and the window (32)
    estimates = measure(0, 1, windows=120, micro=4, accum=8, decay=0.98)
    assert all(value is not None for value in estimates)
    assert abs(estimates[-1] / exact - 1) <= 0.2, (estimates[-1], exact)
    # Smoothing matters: a single step's raw estimate is far noisier than the EMA.
    raw = measure(0, 1, windows=40, micro=4, accum=8, decay=0.0)
    spread = max(raw) / min(v for v in raw if v > 0)
    assert spread > 2, raw


def test_two_ranks_average_their_small_readings_and_agree():
    exact = brute_force()
    results = run_ranks(measure, 100, 4, 4, 0.98, world_size=2, timeout_s=180)
    assert results[0] == results[1]  # every rank reports the same estimate
    assert abs(results[0][-1] / exact - 1) <= 0.2, (results[0][-1], exact)


def test_a_mid_window_state_keeps_the_windows_small_batch_reading():
    plan = BatchPlan(micro_batch_size=4, accum_steps=4, world_size=1)
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator) + 1) for _ in range(8)]
    estimates = []
    for resume in (False, True):
        model = make_model()
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), plan, noise_scale=0.5)
        for index, (x, y) in enumerate(batches):
            if resume and index == 6:  # mid-window (micro-step 2 of 4): the reading was taken at micro-step 0
                state = acc.state_dict(include_grads=True)
                acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), plan, noise_scale=0.5)
                acc.load_state_dict(state)
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
        estimates.append(acc.last_step.noise_scale)
    assert estimates[0] is not None and estimates[1] == estimates[0]
