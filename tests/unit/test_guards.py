"""Loops that were silently wrong (issue 24's misuse list): refused at construction, or stopped at the first sign."""

from __future__ import annotations

import pytest
import torch

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model

MICRO = 4


def _acc(model=None, optimizer=None, accum_steps=2, **options):
    model = model if model is not None else make_model()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=accum_steps, world_size=1)
    return model, optimizer, Accumulator(model, optimizer, plan, **options)


def _micro_step(acc, model, seed=0):
    x, y = make_data(1, MICRO, seed=seed)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reduce_lr_on_plateau_is_refused_at_construction_with_the_fix():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match=r"scheduler=ReduceLROnPlateau: its step\(\) needs the metric.*plateau.step"):
        _acc(model, optimizer, scheduler=plateau)


def test_an_optimizer_over_another_model_is_refused():
    model, other = make_model(), make_model(seed=1)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"none of them a trainable parameter of the model.*never move"):
        _acc(model, optimizer)


def test_a_loss_from_another_model_is_named_at_the_first_step():
    model, other = make_model(), make_model(seed=1)
    _, _, acc = _acc(model)
    x, y = make_data(1, MICRO)
    with acc.micro_step():
        acc.backward(loss_fn(other(x[0]), y[0]))
    with pytest.raises(ValueError, match=r"no gradient reached any of the optimizer's 6 parameters in the first"):
        with acc.micro_step():
            acc.backward(loss_fn(other(x[0]), y[0]))


def test_an_extra_parameter_in_the_optimizer_is_fine_on_one_process():
    model = make_model()
    temperature = torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    _acc(model, optimizer)  # one process: nothing to average, so a parameter outside the model is exact


def test_optimizer_step_inside_a_window_is_refused_before_it_steps():
    model, optimizer, acc = _acc()
    _micro_step(acc, model)
    before = _weights(model)
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) was called inside an accumulation window"):
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _micro_step(acc, model, seed=1)
    assert acc.optimizer_steps == 1  # the accumulator's own step goes through
    optimizer.step()  # between windows (no gradients): the user's business


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_inside_a_window_is_named_at_the_next_backward(set_to_none):
    model, optimizer, acc = _acc(accum_steps=3)
    _micro_step(acc, model)
    optimizer.zero_grad(set_to_none=set_to_none)
    with pytest.raises(RuntimeError, match=r"gradients accumulated in this window were changed.*zero_grad"):
        _micro_step(acc, model, seed=1)


def test_a_clip_by_hand_inside_a_window_is_named():
    model, _, acc = _acc(accum_steps=3)
    _micro_step(acc, model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(RuntimeError, match=r"max_grad_norm=\.\.\. for clipping"):
        _micro_step(acc, model, seed=1)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # torch's, for the loop's call
def test_a_scheduler_stepped_by_the_loop_too_is_named_at_the_boundary():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _, _, acc = _acc(model, optimizer, scheduler=scheduler)
    _micro_step(acc, model)
    scheduler.step()  # the loop steps it as well
    with pytest.raises(RuntimeError, match=r"scheduler passed to the Accumulator was stepped outside it"):
        _micro_step(acc, model, seed=1)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_scheduler_state_loaded_before_the_first_micro_step_is_not_a_second_stepper():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _, _, acc = _acc(model, optimizer, scheduler=scheduler)
    saved = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        saved.step()
    scheduler.load_state_dict(saved.state_dict())  # a resume done by hand, after building the accumulator
    for seed in range(4):
        _micro_step(acc, model, seed=seed)
    assert acc.optimizer_steps == 2 and scheduler.last_epoch == 5


@pytest.mark.parametrize(
    ("loss", "error", "match"),
    [
        (0.5, TypeError, r"needs the loss as a tensor with a gradient, got float 0.5"),
        (torch.tensor(0.5), ValueError, r"loss does not require a gradient"),
    ],
)
def test_a_loss_that_cannot_train_is_named(loss, error, match):
    _, _, acc = _acc()
    with pytest.raises(error, match=match):
        with acc.micro_step():
            acc.backward(loss)


@pytest.mark.parametrize(
    ("num_items", "error", "match"),
    [
        (True, TypeError, r"num_items must be an int or a one-element integer tensor.*got bool True"),
        (torch.tensor([3, 4]), ValueError, r"one-element integer tensor, got a torch.int64 tensor of shape \(2,\)"),
        ("3", TypeError, r"got str '3'"),
    ],
)
def test_num_items_that_is_not_a_count_is_named(num_items, error, match):
    model, _, acc = _acc()
    x, y = make_data(1, MICRO)
    with pytest.raises(error, match=match):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]), num_items=num_items)


def test_a_whole_float_and_a_one_element_tensor_are_counts():
    model, _, acc = _acc()
    x, y = make_data(1, 2 * MICRO)
    for index, count in enumerate([3.0, torch.tensor([5])]):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0, index * MICRO : (index + 1) * MICRO]), y[0, :MICRO]), num_items=count)
    assert acc.last_step.num_items == 8
