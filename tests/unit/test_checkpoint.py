"""distaccum.checkpoint: atomic save/load of the training state at window boundaries (one process here; the
2-rank DDP save-on-rank-0 / load-everywhere path runs in tests/launch/test_launch_files.py through torchrun)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from distaccum import Accumulator, BatchPlan, checkpoint
from tests.helpers.common import loss_fn, make_data, make_model, max_relative_error

PLAN = BatchPlan(global_batch_size=8, micro_batch_size=4, world_size=1)


def setup(plan: BatchPlan = PLAN):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler, Accumulator(model, optimizer, plan, scheduler=scheduler)


def train(model, acc: Accumulator, steps: range) -> None:
    inputs, targets = make_data(4, PLAN.global_batch_size)  # the same 4 steps of data for every run
    for step in steps:
        for x, y in zip(inputs[step].split(4), targets[step].split(4), strict=True):
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))


def test_resume_continues_exactly_where_an_uninterrupted_run_goes(tmp_path: Path) -> None:
    model, optimizer, scheduler, acc = setup()
    train(model, acc, range(4))
    expected = {name: value.clone() for name, value in model.state_dict().items()}

    model, optimizer, scheduler, acc = setup()
    train(model, acc, range(2))
    objects = {"model": model, "optimizer": optimizer, "accumulator": acc, "scheduler": scheduler}
    checkpoint.save(tmp_path, **objects, data_state={"step": 2})
    model, optimizer, scheduler, acc = setup()
    objects = {"model": model, "optimizer": optimizer, "accumulator": acc, "scheduler": scheduler}
    assert checkpoint.load(tmp_path, **objects) == {"step": 2}
    assert acc.optimizer_steps == 2 and scheduler.get_last_lr() == [1e-2 / 4]
    train(model, acc, range(2, 4))
    assert max_relative_error(model.state_dict(), expected) == 0.0  # same operations, same order: bit-exact


def test_load_without_checkpoint_returns_none(tmp_path: Path) -> None:
    model, optimizer, _, acc = setup()
    assert checkpoint.load(tmp_path / "missing", model=model, optimizer=optimizer, accumulator=acc) is None
    assert checkpoint.latest(tmp_path) is None


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path: Path) -> None:
    model, optimizer, _, acc = setup()
    for step in range(3):  # 3 of the 4 data steps
        train(model, acc, range(step, step + 1))
        checkpoint.save(tmp_path, model=model, optimizer=optimizer, accumulator=acc, keep=2)
    # A job killed while writing leaves a temporary directory and maybe a renamed one without meta: never read.
    (tmp_path / ".tmp-step-00000004-123").mkdir()
    (tmp_path / "step-00000009").mkdir()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003", "step-00000009"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000003"
    (tmp_path / "latest").write_text("step-00000009\n")  # pointer to an incomplete one: the newest complete one
    with pytest.warns(UserWarning, match=r"names 'step-00000009', which is not a complete checkpoint.*step-00000003"):
        assert checkpoint.latest(tmp_path) == tmp_path / "step-00000003"


def test_save_mid_window_is_refused(tmp_path: Path) -> None:
    model, optimizer, _, acc = setup()
    x, y = make_data(1, 4)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))
    with pytest.raises(ValueError, match=r"mid-window \(micro-step 1 of 2\).*Save right after an optimizer step"):
        checkpoint.save(tmp_path, model=model, optimizer=optimizer, accumulator=acc)


def test_load_refuses_missing_scheduler_and_other_plan(tmp_path: Path) -> None:
    model, optimizer, scheduler, acc = setup()
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, accumulator=acc, scheduler=scheduler)
    with pytest.raises(ValueError, match=r"has a scheduler state but scheduler=None was given"):
        checkpoint.load(tmp_path, model=model, optimizer=optimizer, accumulator=acc)
    model, optimizer, scheduler, acc = setup(BatchPlan(global_batch_size=16, micro_batch_size=4, world_size=1))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint was made with plan \(global_batch_size 8"):
        checkpoint.load(tmp_path, model=model, optimizer=optimizer, accumulator=acc, scheduler=scheduler)
    assert max_relative_error(model.state_dict(), before) == 0.0  # refused before anything was overwritten


def test_unwrap_gives_plain_tensor_names() -> None:
    inner = make_model()
    assert checkpoint.unwrap(torch.compile(inner)) is inner
    assert not any(name.startswith(("module.", "_orig_mod.")) for name in checkpoint.unwrap(inner).state_dict())


def _snapshot(model, optimizer, acc: Accumulator) -> list:
    """Everything a load could change, copied: weights, gradients, optimizer and accumulator state."""
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return copy.deepcopy([model.state_dict(), grads, optimizer.state_dict(), acc.state_dict(include_grads=True)])


def _same(actual, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and torch.equal(actual, expected)
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_same(actual[k], expected[k]) for k in expected)
    if isinstance(expected, list | tuple):
        return len(actual) == len(expected) and all(_same(a, e) for a, e in zip(actual, expected, strict=True))
    return actual == expected


def _mid_window(model, acc: Accumulator) -> None:
    """One micro-step of a window that never ends: its gradient is in param.grad (seeded data, not the run's)."""
    x, y = make_data(1, 4, seed=9)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))


def test_load_into_an_accumulator_mid_window_equals_a_clean_resume(tmp_path: Path) -> None:
    model, optimizer, scheduler, acc = setup()
    train(model, acc, range(2))
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, accumulator=acc, scheduler=scheduler)
    results = []
    for stale in (False, True):
        model, optimizer, scheduler, acc = setup()
        if stale:  # a loop that trained a little, then decided to resume: that window's gradient must go
            _mid_window(model, acc)
        checkpoint.load(tmp_path, model=model, optimizer=optimizer, accumulator=acc, scheduler=scheduler)
        assert acc.micro_step_in_window == 0 and all(p.grad is None for p in model.parameters())
        train(model, acc, range(2, 4))
        results.append({name: value.clone() for name, value in model.state_dict().items()})
    assert max_relative_error(results[1], results[0]) == 0.0


def _other_shape() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("model", r"does not fit this model and optimizer: 0.weight has shape \(32, 8\) there and \(16, 8\) here"),
        ("optimizer", r"the optimizer has \[6\] parameters per group there and \[2, 4\] here"),
    ],
)
def test_a_load_that_does_not_fit_changes_nothing(tmp_path: Path, target: str, message: str) -> None:
    model, optimizer, scheduler, acc = setup()
    train(model, acc, range(2))
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, accumulator=acc, scheduler=scheduler)
    model = _other_shape() if target == "model" else make_model(seed=3)
    params = list(model.parameters())
    groups = [{"params": params}] if target == "model" else [{"params": params[:2]}, {"params": params[2:]}]
    optimizer = torch.optim.Adam(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = Accumulator(model, optimizer, PLAN, scheduler=scheduler)
    train(model, acc, range(1))
    _mid_window(model, acc)  # a step taken and a window open: all of it must survive the refused load
    before = _snapshot(model, optimizer, acc)
    with pytest.raises(ValueError, match=message + r".*nothing was loaded\. Build them as that run did"):
        checkpoint.load(tmp_path, model=model, optimizer=optimizer, accumulator=acc, scheduler=scheduler)
    assert _same(_snapshot(model, optimizer, acc), before)


def test_a_regular_file_or_a_single_checkpoint_is_refused_naming_the_directory_to_pass(tmp_path: Path) -> None:
    model, optimizer, _, acc = setup()
    objects = {"model": model, "optimizer": optimizer, "accumulator": acc}
    file = tmp_path / "checkpoint.pt"
    file.write_bytes(b"not a directory")
    with pytest.raises(ValueError, match=r"checkpoint directory '.*checkpoint.pt' is a regular file.*Pass that dir"):
        checkpoint.load(file, **objects)
    with pytest.raises(ValueError, match=r"is a regular file"):
        checkpoint.save(file, **objects)
    saved = checkpoint.save(tmp_path / "run", **objects)
    with pytest.raises(ValueError, match=r"is one checkpoint \(it has meta.json\).*Pass its parent, '.*run'"):
        checkpoint.load(saved, **objects)
