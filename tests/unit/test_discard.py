"""Exceptions inside a window: the window is discarded on every rank, training goes on exactly from the next one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, max_relative_error

MICRO, ACCUM, WINDOWS = 4, 3, 4
EXACT = 1e-6


class Boom(Exception):
    pass


def reference_without(skipped: set[int]) -> dict[str, torch.Tensor]:
    """One process on the real batch of every window except ``skipped`` (not through distaccum)."""
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    inputs, targets = make_data(WINDOWS, ACCUM * MICRO)
    for window in range(WINDOWS):
        if window not in skipped:
            optimizer.zero_grad()
            loss_fn(model(inputs[window]), targets[window]).backward()
            optimizer.step()
    return model.state_dict()


def train(fail_at: tuple[int, int], when: str, *, num_items: bool = False, **kwargs) -> tuple[Accumulator, dict]:
    """Every window's micro-steps; at (window, micro-step) ``fail_at`` the block raises ``Boom`` ``when``
    ("before" or "after") its backward, and the loop catches it and goes on, as a user's loop would."""
    model = make_model()
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(accum_steps=ACCUM, micro_batch_size=MICRO), **kwargs
    )
    inputs, targets = make_data(WINDOWS, ACCUM * MICRO)
    for window in range(WINDOWS):
        for index, (x, y) in enumerate(zip(inputs[window].split(MICRO), targets[window].split(MICRO), strict=True)):
            try:
                with acc.micro_step():
                    if (window, index) == fail_at and when == "before":
                        raise Boom
                    loss = loss_fn(model(x), y)
                    acc.backward(loss, num_items=MICRO) if num_items else acc.backward(loss)
                    if (window, index) == fail_at and when == "after":
                        raise Boom
            except Boom:
                pass
    return acc, model.state_dict()


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "items"])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("index", [0, ACCUM - 1], ids=["inside", "boundary"])
def test_a_micro_step_that_raises_discards_its_window_and_training_goes_on_exactly(index, when, num_items):
    acc, weights = train((1, index), when, num_items=num_items)
    assert (acc.optimizer_steps, acc.skipped_steps) == (WINDOWS, 1)
    assert max_relative_error(weights, reference_without({1})) <= EXACT
    assert max_relative_error(weights, reference_without(set())) > 1e3 * EXACT  # the check can fail


def test_the_discarded_step_reports_itself():
    model = make_model()
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(accum_steps=2, micro_batch_size=MICRO)
    )
    x, y = make_data(1, MICRO)
    with pytest.raises(Boom):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]))
            raise Boom
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))
    step = acc.last_step
    assert step.skipped and step.micro_steps == 2 and step.loss != step.loss  # NaN: no meaningful window loss
    assert all(p.grad is None for p in model.parameters())


def test_on_nonfinite_raise_leaves_a_clean_window_behind():
    model = make_model()
    plan = BatchPlan(accum_steps=ACCUM, micro_batch_size=MICRO)
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan, on_nonfinite="raise")
    inputs, targets = make_data(WINDOWS, ACCUM * MICRO)
    raised = 0
    for window in range(WINDOWS):
        for index, (x, y) in enumerate(zip(inputs[window].split(MICRO), targets[window].split(MICRO), strict=True)):
            try:
                with acc.micro_step():
                    loss = loss_fn(model(x), y)
                    acc.backward(loss * float("nan") if (window, index) == (1, 0) else loss)
            except FloatingPointError:
                raised += 1
    assert raised == 1 and acc.micro_step_in_window == 0
    assert max_relative_error(model.state_dict(), reference_without({1})) <= EXACT


def test_discard_window_skips_the_step_at_its_boundary_and_is_a_no_op_between_windows():
    model = make_model()
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(accum_steps=ACCUM, micro_batch_size=MICRO)
    )
    inputs, targets = make_data(WINDOWS, ACCUM * MICRO)
    for window in range(WINDOWS):
        acc.discard_window()  # between windows: nothing to discard
        for index, (x, y) in enumerate(zip(inputs[window].split(MICRO), targets[window].split(MICRO), strict=True)):
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
            if (window, index) == (2, 1):
                acc.discard_window()
    assert (acc.optimizer_steps, acc.skipped_steps) == (WINDOWS, 1)
    assert max_relative_error(model.state_dict(), reference_without({2})) <= EXACT


def test_a_sharded_boundary_that_raised_before_backward_refuses_to_go_on(tmp_path: Path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    model = fully_shard(make_model(), mesh=init_device_mesh("cpu", (1,)))
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(accum_steps=2, micro_batch_size=MICRO)
    )
    x, y = make_data(1, MICRO)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))
    with pytest.raises(Boom):
        with acc.micro_step():
            raise Boom
    with pytest.raises(RuntimeError, match=r"fsdp2 boundary micro-step raised before acc.backward.*checkpoint"):
        with acc.micro_step():
            pass
