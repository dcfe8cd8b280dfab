"""Accumulator behaviour on one process: boundary rule, flush, clipping, scheduler, scaler, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, BatchSchedule, StepResult
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, max_relative_error, reference_run

MICRO = 4


def accumulator(accum_steps: int = 4, optimizer_name: str = "sgd", **kwargs) -> tuple[nn.Module, Accumulator]:
    model = make_model()
    optimizer = make_optimizer(optimizer_name, model.parameters())
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=accum_steps, world_size=1)
    return model, Accumulator(model, optimizer, plan, **kwargs)


def run_window(model: nn.Module, acc: Accumulator, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    for x, y in zip(inputs.split(MICRO), targets.split(MICRO), strict=True):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))


def test_steps_only_at_the_boundary_and_reports_it():
    model, acc = accumulator(accum_steps=3)
    inputs, targets = make_data(1, 3 * MICRO)
    seen = []
    for x, y in zip(inputs[0].split(MICRO), targets[0].split(MICRO), strict=True):
        boundary_before = acc.is_boundary
        with acc.micro_step():
            seen.append((boundary_before, acc.is_boundary))
            acc.backward(loss_fn(model(x), y))
        seen.append(acc.stepped)
    assert seen == [(False, False), False, (False, False), False, (True, True), True]
    assert acc.optimizer_steps == 1 and acc.micro_step_in_window == 0
    assert isinstance(acc.last_step, StepResult)
    assert acc.last_step.micro_steps == 3 and not acc.last_step.skipped
    expected_loss = loss_fn(make_model()(inputs[0]), targets[0]).item()
    assert acc.last_step.loss == pytest.approx(expected_loss, rel=1e-6)


def test_gradients_are_zeroed_after_each_step():
    model, acc = accumulator(accum_steps=2)
    inputs, targets = make_data(1, 2 * MICRO)
    run_window(model, acc, inputs[0], targets[0])
    assert all(p.grad is None for p in model.parameters())


def test_flushed_short_window_equals_real_batch_of_what_it_saw():
    # Window 1: 4 micro-batches (16 samples); then the data ends after 2 more (8 samples).
    model, acc = accumulator(accum_steps=4, optimizer_name="adam")
    inputs, targets = make_data(1, 24)
    run_window(model, acc, inputs[0], targets[0])
    assert acc.optimizer_steps == 1 and acc.micro_step_in_window == 2
    result = acc.flush()
    assert result is not None and result.micro_steps == 2 and acc.optimizer_steps == 2
    assert acc.flush() is None  # nothing pending any more

    reference = make_model()
    optimizer = make_optimizer("adam", reference.parameters())
    for batch in (slice(0, 16), slice(16, 24)):
        optimizer.zero_grad()
        loss_fn(reference(inputs[0][batch]), targets[0][batch]).backward()
        optimizer.step()
    assert max_relative_error(model.state_dict(), reference.state_dict()) <= 1e-6


def test_last_micro_step_makes_a_short_window_boundary():
    model, acc = accumulator(accum_steps=4)
    inputs, targets = make_data(1, 8)
    chunks = list(zip(inputs[0].split(MICRO), targets[0].split(MICRO), strict=True))
    for index, (x, y) in enumerate(chunks):
        with acc.micro_step(last=index == len(chunks) - 1):
            acc.backward(loss_fn(model(x), y))
    assert acc.optimizer_steps == 1 and acc.last_step.micro_steps == 2
    reference = make_model()
    optimizer = make_optimizer("sgd", reference.parameters())
    loss_fn(reference(inputs[0]), targets[0]).backward()
    optimizer.step()
    assert max_relative_error(model.state_dict(), reference.state_dict()) <= 1e-6


def test_clipping_uses_the_whole_window_norm():
    steps, accum = 3, 4
    max_norm = 0.05
    model, acc = accumulator(accum_steps=accum, max_grad_norm=max_norm)
    inputs, targets = make_data(steps, accum * MICRO)
    norms = []
    for step in range(steps):
        run_window(model, acc, inputs[step], targets[step])
        norms.append(acc.last_step.grad_norm)
    expected_state, expected_norms = reference_run("sgd", steps, accum * MICRO, max_grad_norm=max_norm)
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    assert min(expected_norms) > max_norm  # clipping really happened
    assert max_relative_error(model.state_dict(), expected_state) <= 1e-6


@pytest.mark.parametrize("ask", ["nothing", "report_grad_norm", "max_grad_norm"])
def test_the_norm_is_computed_only_when_asked_or_clipping(ask):
    steps, accum = 2, 4
    kwargs = {"report_grad_norm": {"report_grad_norm": True}, "max_grad_norm": {"max_grad_norm": 1e6}}.get(ask, {})
    model, acc = accumulator(accum_steps=accum, **kwargs)
    inputs, targets = make_data(steps, accum * MICRO)
    norms = []
    for step in range(steps):
        run_window(model, acc, inputs[step], targets[step])
        norms.append(acc.last_step.grad_norm)
    expected_state, expected_norms = reference_run("sgd", steps, accum * MICRO, max_grad_norm=1e6)
    assert norms == ([None] * steps if ask == "nothing" else pytest.approx(expected_norms, rel=1e-5))
    assert max_relative_error(model.state_dict(), expected_state) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_gradient_with_a_finite_loss_is_caught_in_the_weighting_multiply(dtype):
    # num_items makes the window factor != 1, so the check rides on the multiply that applies it (float64 with a
    # factor fp32 cannot hold: a multiply of its own, then the check); the loss stays finite throughout.
    model = make_model(dtype)
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    )
    inputs, targets = make_data(3, 2 * MICRO, dtype)
    before = None
    for step in range(3):
        for micro, (x, y) in enumerate(zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True)):
            with acc.micro_step():
                output = model(x)
                loss = loss_fn(output, y)
                if step == 1 and micro == 0:
                    loss = loss + 0.0 * (output - output.detach()).abs().sum().sqrt()  # 0 forward, NaN backward
                acc.backward(loss, num_items=3 + micro + step)  # the poisoned window's factor: 3.5 * 2 / 9
        if step == 0:
            before = copy.deepcopy(model.state_dict())
        if step == 1:
            assert acc.last_step.skipped and acc.last_step.grad_norm is None
            assert torch.isfinite(torch.tensor(acc.last_step.loss))
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [acc.optimizer_steps, acc.skipped_steps] == [3, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scheduler_steps_once_per_optimizer_step():
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = Accumulator(
        model, optimizer, BatchPlan(micro_batch_size=MICRO, accum_steps=3, world_size=1), scheduler=scheduler
    )
    inputs, targets = make_data(2, 3 * MICRO)
    for step in range(2):
        run_window(model, acc, inputs[step], targets[step])
    assert scheduler.last_epoch == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)


def test_grad_scaler_unscales_and_updates_once_per_step():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = {"unscale_": 0, "update": 0}
    for name in calls:
        original = getattr(scaler, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(scaler, name, spy)
    model, acc = accumulator(accum_steps=4, grad_scaler=scaler)
    inputs, targets = make_data(3, 4 * MICRO)
    for step in range(3):
        run_window(model, acc, inputs[step], targets[step])
    assert calls == {"unscale_": 3, "update": 3}
    assert acc.skipped_steps == 0
    expected, _ = reference_run("sgd", 3, 4 * MICRO)
    assert max_relative_error(model.state_dict(), expected) <= 1e-6  # power-of-two scale: exact


def test_bf16_autocast_on_cpu_equals_the_bf16_real_batch_within_rounding():
    inputs, targets = make_data(3, 4 * MICRO)

    def real_batch(scale: float = 1.0) -> dict[str, torch.Tensor]:  # the same autocast, one process, not distaccum
        model = make_model()
        optimizer = make_optimizer("sgd", model.parameters())
        for step in range(3):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(inputs[step]).float()
            (loss_fn(output, targets[step]) * scale).backward()
            optimizer.step()
        return model.state_dict()

    model, acc = accumulator(accum_steps=4)
    for step in range(3):
        for x, y in zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True):
            with acc.micro_step(), torch.autocast("cpu", dtype=torch.bfloat16):
                acc.backward(loss_fn(model(x).float(), y))
    # Measured: bf16 rounding 4.6e-4 (micro-batches vs one batch); a gradient 10% off moves the weights 2.1e-2.
    expected = real_batch()
    assert max_relative_error(model.state_dict(), expected) < 5e-3
    assert max_relative_error(real_batch(scale=1.1), expected) > 5e-3  # the bound catches a 10% weighting error


def test_nonfinite_gradient_skips_the_step_and_counts_it():
    model, acc = accumulator(accum_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = make_data(1, MICRO)
    for _ in range(2):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]) * float("nan"))
    assert acc.last_step.skipped and acc.skipped_steps == 1 and acc.optimizer_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("report_grad_norm", [False, True])
def test_nonfinite_gradient_raises_when_asked(report_grad_norm):
    model, acc = accumulator(accum_steps=1, on_nonfinite="raise", report_grad_norm=report_grad_norm)
    x, y = make_data(1, MICRO)
    said = "norm nan " if report_grad_norm else ""
    with pytest.raises(FloatingPointError, match=rf"non-finite gradient {said}at optimizer step 1; the step was not"):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]) * float("inf") * 0)


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_disabled_grad_scaler_keeps_the_nonfinite_check(on_nonfinite):
    # GradScaler("cpu", enabled=args.fp16) is a common pattern: disabled, it must not switch off the NaN guard.
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, acc = accumulator(accum_steps=2, grad_scaler=scaler, on_nonfinite=on_nonfinite)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = make_data(1, 2 * MICRO)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0, :MICRO]), y[0, :MICRO]))
    nan_batch = (x[0, MICRO:], y[0, MICRO:])
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"non-finite gradient at optimizer step 1"):
            with acc.micro_step():
                acc.backward(loss_fn(model(nan_batch[0]), nan_batch[1]) * float("nan"))
    else:
        with acc.micro_step():
            acc.backward(loss_fn(model(nan_batch[0]), nan_batch[1]) * float("nan"))
        assert acc.last_step.skipped and acc.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "NaN reached the weights"


def test_grad_scaler_overflow_skips_the_step_backs_off_and_leaves_the_scheduler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = Accumulator(
        model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO), scheduler=scheduler, grad_scaler=scaler
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = make_data(1, MICRO)
    for factor in (1.0, float("inf")):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]) * factor)
    assert acc.last_step.skipped and acc.skipped_steps == 1
    assert scaler.get_scale() == 2.0**9 and scheduler.last_epoch == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_param_group_added_after_construction_is_clipped_and_weighted_too():
    def build():
        torch.manual_seed(0)
        head, extra = nn.Linear(8, 4), nn.Linear(8, 4)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
        return head, extra, optimizer

    inputs, targets = make_data(2, 3 * MICRO)
    head, extra, optimizer = build()  # the reference: one process, the real batch, clipping over both groups
    optimizer.add_param_group({"params": list(extra.parameters())})
    for step in range(2):
        optimizer.zero_grad()
        loss_fn(head(inputs[step]) + extra(inputs[step]), targets[step]).backward()
        torch.nn.utils.clip_grad_norm_([*head.parameters(), *extra.parameters()], 0.05)
        optimizer.step()
    expected = {**head.state_dict(), **{f"extra.{k}": v for k, v in extra.state_dict().items()}}
    head, extra, optimizer = build()
    acc = Accumulator(head, optimizer, BatchPlan(accum_steps=4, micro_batch_size=MICRO), max_grad_norm=0.05)
    optimizer.add_param_group({"params": list(extra.parameters())})  # after the Accumulator was built
    for step in range(2):  # 3 micro-batches of a 4-step window: a short window, so the factor matters too
        for x, y in zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True):
            with acc.micro_step():
                acc.backward(loss_fn(head(x) + extra(x), y))
        acc.flush()
    actual = {**head.state_dict(), **{f"extra.{k}": v for k, v in extra.state_dict().items()}}
    assert max_relative_error(actual, expected) <= 1e-6


def test_a_window_without_items_leaves_the_optimizer_and_scheduler_untouched():
    model = make_model()
    optimizer = make_optimizer("adam", model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO), scheduler=scheduler)
    x, y = make_data(3, MICRO)

    def window(count: int) -> None:
        for index in range(2):
            with acc.micro_step():
                acc.backward(loss_fn(model(x[index]), y[index]) * min(count, 1), num_items=count)

    window(MICRO)  # one real step first, so that Adam has state to disturb
    saved = copy.deepcopy(optimizer.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    window(0)
    assert acc.last_step.skipped and acc.last_step.num_items == 0
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-2)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][key], saved["state"][i][key]) for i in saved["state"] for key in saved["state"][i])


def test_state_dict_round_trips_counters_and_rejects_another_plan():
    model, acc = accumulator(accum_steps=4)
    inputs, targets = make_data(1, 6 * MICRO)
    for x, y in list(zip(inputs[0].split(MICRO), targets[0].split(MICRO), strict=True)):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    state = acc.state_dict()
    assert (state["optimizer_steps"], state["micro_step"]) == (1, 2)
    _, fresh = accumulator(accum_steps=4)
    with pytest.warns(UserWarning, match=r"mid-window"):  # the window's gradients were not saved
        fresh.load_state_dict(state)
    assert (fresh.optimizer_steps, fresh.micro_step_in_window) == (1, 2)
    _, other = accumulator(accum_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint was made with plan \(global_batch_size 16 = accum_steps 4"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- bad input
def test_backward_outside_micro_step_is_an_error():
    model, acc = accumulator()
    x, y = make_data(1, MICRO)
    with pytest.raises(RuntimeError, match=r"acc.backward\(\) was called outside `with acc.micro_step\(\):`"):
        acc.backward(loss_fn(model(x[0]), y[0]))


def test_nested_micro_step_is_an_error():
    _, acc = accumulator()
    with pytest.raises(RuntimeError, match=r"micro-steps do not nest"):
        with acc.micro_step():
            with acc.micro_step():
                pass


def test_micro_step_without_backward_is_an_error_that_discards_its_window():
    model, acc = accumulator(accum_steps=2)
    with pytest.raises(RuntimeError, match=r"ended without acc.backward\(loss\)"):
        with acc.micro_step():
            pass
    # It still counts (every rank keeps the same position) and its window will not step.
    assert acc.micro_step_in_window == 1
    x, y = make_data(1, MICRO)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))
    assert acc.last_step.skipped and acc.skipped_steps == 1


def test_backward_twice_in_one_micro_step_is_an_error():
    model, acc = accumulator()
    x, y = make_data(1, MICRO)
    with pytest.raises(RuntimeError, match=r"called twice in one micro-step"):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]))
            acc.backward(loss_fn(model(x[0]), y[0]))


def test_non_scalar_loss_is_an_error():
    model, acc = accumulator()
    x, _ = make_data(1, MICRO)
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor, got shape \(4, 4\)"):
        with acc.micro_step():
            acc.backward(model(x[0]))


def test_mixing_num_items_within_a_window_is_an_error():
    model, acc = accumulator()
    x, y = make_data(1, MICRO)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]), num_items=4)
    with pytest.raises(ValueError, match=r"num_items was not given in this micro-step but was given earlier"):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]))


@pytest.mark.parametrize("num_items", [-1, 2.5])
def test_bad_num_items_is_an_error(num_items):
    model, acc = accumulator()
    x, y = make_data(1, MICRO)
    with pytest.raises(ValueError, match=r"num_items must be a non-negative integer"):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]), num_items=num_items)


@pytest.mark.parametrize("value", [0, -1.0, "1"])
def test_bad_max_grad_norm_is_an_error(value):
    model = make_model()
    with pytest.raises(ValueError, match=r"max_grad_norm must be a positive number or None"):
        Accumulator(
            model,
            make_optimizer("sgd", model.parameters()),
            BatchPlan(global_batch_size=8, micro_batch_size=4, world_size=1),
            max_grad_norm=value,
        )


def test_plan_for_another_world_size_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what a launcher says, before the group exists
    model = make_model()
    plan = BatchPlan(global_batch_size=16, micro_batch_size=4, world_size=1)
    with pytest.raises(ValueError, match=r"plan.world_size is 1 but this job runs 2 rank\(s\).*for_world_size\(2\)"):
        Accumulator(model, make_optimizer("sgd", model.parameters()), plan)


def test_unwrapped_model_on_several_ranks_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = make_model()
    plan = BatchPlan(global_batch_size=16, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"model is a plain Sequential but world_size is 2.*DistributedDataParallel"):
        Accumulator(model, make_optimizer("sgd", model.parameters()), plan)


def test_gradients_left_before_the_first_micro_step_are_named_with_the_fix():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn(model(torch.randn(4, 8)), torch.randn(4, 4)).backward()  # e.g. a warm-up backward, never zeroed
    acc = Accumulator(model, optimizer, BatchPlan(micro_batch_size=4, accum_steps=2, world_size=1))
    with pytest.warns(
        UserWarning, match=r"6 parameter\(s\) already held a gradient.*dropped.*zero_grad\(set_to_none=True\)"
    ) as seen:
        with acc.micro_step():
            acc.backward(loss_fn(model(torch.randn(4, 8)), torch.randn(4, 4)))
    assert seen[0].filename == __file__  # the user's `with` line (it pointed past it, at sys:1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later micro-steps hold the window's own gradients
        with acc.micro_step():
            acc.backward(loss_fn(model(torch.randn(4, 8)), torch.randn(4, 4)))
    optimizer.zero_grad(set_to_none=True)
    fresh = Accumulator(model, optimizer, BatchPlan(micro_batch_size=4, accum_steps=2, world_size=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fresh.micro_step():
            fresh.backward(loss_fn(model(torch.randn(4, 8)), torch.randn(4, 4)))


def _first_step_after_a_stale_gradient(*, through_iterate: bool, num_items: bool, stale: bool):
    torch.manual_seed(3)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if stale:
        (model(torch.randn(4, 8)).sum() * 10).backward()  # a leftover gradient, far from the window's
    acc = Accumulator(model, optimizer, BatchPlan(micro_batch_size=4, accum_steps=2, world_size=1))
    x, y = make_data(1, 8)
    batches = list(zip(x[0].split(4), y[0].split(4), strict=True))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for index, (inputs, targets) in enumerate(acc.iterate(batches) if through_iterate else batches):
            with acc.micro_step():
                acc.backward(loss_fn(model(inputs), targets), num_items=3 + index if num_items else None)
    named = [w for w in seen if "already held a gradient" in str(w.message)]
    return {k: v.clone() for k, v in model.state_dict().items()}, len(named)


@pytest.mark.parametrize("through_iterate", [False, True], ids=["loop", "iterate"])
@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "num_items"])
def test_a_stale_gradient_is_dropped_with_a_warning_in_every_loop(through_iterate, num_items):
    # Issue 24, rows 5 and 6: under acc.iterate() nothing warned (its rank agreement skipped the first micro-step's
    # checks), and with num_items the leftover gradient was multiplied by the window's item factor.
    clean, _ = _first_step_after_a_stale_gradient(through_iterate=through_iterate, num_items=num_items, stale=False)
    weights, warned = _first_step_after_a_stale_gradient(
        through_iterate=through_iterate, num_items=num_items, stale=True
    )
    assert warned == 1
    assert all(torch.equal(weights[k], clean[k]) for k in clean), "the leftover gradient reached the first step"


def test_a_wrapper_whose_no_sync_fails_to_enter_leaves_the_accumulator_usable():
    # The with-block object abandons the micro-step itself when the wrapper's context fails on entry (no __exit__
    # follows): the next micro-step must not be refused as nested.
    model, acc = accumulator(accum_steps=2)

    class Failing:
        def __enter__(self):
            raise RuntimeError("the wrapper could not turn off its gradient sync")

        def __exit__(self, *exc):
            return False

    acc._backend.window_sync = Failing  # an instance attribute, over the class's method
    x, y = make_data(1, 2 * MICRO)
    with pytest.raises(RuntimeError, match="could not turn off"):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0, :MICRO]), y[0, :MICRO]))
    del acc._backend.window_sync
    with acc.micro_step():  # the window's boundary: the failed micro-step counted, and the window is discarded
        acc.backward(loss_fn(model(x[0, MICRO:]), y[0, MICRO:]))
    assert acc.last_step.skipped and acc.optimizer_steps == 1


@pytest.fixture
def accelerator_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Gradients answer as on a GPU, where a host read is a sync: the NaN/inf check runs before the boundary's one
    read (its flag rides on it) instead of inside the step's fused multiply, whose calls are counted here."""
    from distaccum.backends import base

    fused: list[int] = []
    check_and_scale = base.Backend._check_and_scale
    monkeypatch.setattr(base, "read_is_a_sync", lambda tensor: True)
    monkeypatch.setattr(
        base.Backend, "_check_and_scale", lambda self, *args: fused.append(1) or check_and_scale(self, *args)
    )
    return fused


def test_on_an_accelerator_the_nonfinite_check_rides_on_the_boundary_read(accelerator_reads):
    test_a_nan_gradient_with_a_finite_loss_is_caught_in_the_weighting_multiply(torch.float32)
    test_flushed_short_window_equals_real_batch_of_what_it_saw()  # a short window: factor 2, applied on its own
    test_nonfinite_gradient_raises_when_asked(False)
    assert accelerator_reads == []  # no fused check (on a GPU, no second read) in any of them


def _norm_and_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records, in order, each gradient norm computed and each read of the window's scalars (with a norm or not),
    while the clipping test runs (its exactness holds whichever way it goes)."""
    from distaccum import collectives
    from distaccum.backends.base import Backend

    calls: list[str] = []
    grad_norm, read = Backend._grad_norm, collectives.sum_checking_step
    monkeypatch.setattr(Backend, "_grad_norm", lambda self, params: calls.append("norm") or grad_norm(self, params))
    monkeypatch.setattr(
        collectives,
        "sum_checking_step",
        lambda *args, **kwargs: (
            calls.append("read with it" if kwargs.get("shared") is not None else "read") or read(*args, **kwargs)
        ),
    )
    test_clipping_uses_the_whole_window_norm()
    return calls


def test_with_clipping_on_an_accelerator_the_norm_is_computed_once_and_read_with_the_window_scalars(
    monkeypatch, accelerator_reads
):
    # The norm is computed before the boundary's all-reduce and read with the window's scalars: on a GPU one host
    # sync per step, not one for the scalars and one for the norm.
    assert _norm_and_reads(monkeypatch) == ["norm", "read with it"] * 3


def test_with_clipping_on_the_cpu_the_norm_is_read_at_the_step(monkeypatch):
    # On the CPU a read costs nothing, and joining the norm to the scalars cost 33 us per step (one process, tiny
    # model, `python -m examples.bench.harness --overhead`): there it is computed at the step, after the one read of
    # the scalars.
    assert _norm_and_reads(monkeypatch) == ["read", "norm"] * 3


def test_a_float64_default_dtype_trains_equal_to_the_real_batch(monkeypatch):
    # Issue 24, row 1: torch.set_default_dtype(torch.float64) crashed the first step (the non-finite check's flag
    # buffers took the default dtype, and GradScaler's kernel takes float32 only).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        reference, _ = reference_run("adam", 3, 2 * MICRO, torch.float64)
        model = make_model(torch.float64)
        optimizer = make_optimizer("adam", model.parameters())
        acc = Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO))
        x, y = make_data(3, 2 * MICRO, torch.float64)
        for step in range(3):
            for inputs, targets in zip(x[step].split(MICRO), y[step].split(MICRO), strict=True):
                with acc.micro_step():
                    acc.backward(loss_fn(model(inputs), targets), num_items=MICRO)  # a factor != 1 as well
        assert acc.optimizer_steps == 3
        assert max_relative_error(model.state_dict(), reference) < 1e-12
    finally:
        torch.set_default_dtype(previous)


def test_a_raised_nonfinite_step_counts_its_samples_like_a_skipped_one():
    # Issue 24, row 4: with on_nonfinite="raise" the raised window's samples were never counted, so a BatchSchedule
    # (and any LR keyed on samples) lagged one window behind the data.
    counts = {}
    for policy in ("skip", "raise"):
        model = make_model()
        optimizer = make_optimizer("sgd", model.parameters())
        schedule = BatchSchedule(micro_batch_size=MICRO, stages=[(0, 2 * MICRO), (2 * MICRO, 4 * MICRO)], world_size=1)
        acc = Accumulator(model, optimizer, schedule, on_nonfinite=policy)
        x, y = make_data(1, 2 * MICRO)
        try:
            for index, (inputs, targets) in enumerate(zip(x[0].split(MICRO), y[0].split(MICRO), strict=True)):
                with acc.micro_step():
                    acc.backward(loss_fn(model(inputs), targets) * (float("nan") if index else 1.0))
        except FloatingPointError:
            assert policy == "raise"
        counts[policy] = (acc.consumed_samples, acc.optimizer_steps, acc.skipped_steps, acc.last_step.skipped)
        counts[policy] += (acc.plan.accum_steps,)
    assert counts["raise"] == counts["skip"] == (2 * MICRO, 1, 1, True, 4)
