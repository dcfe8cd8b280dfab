"""distaccum.checkpoint: atomic save/load of the training state at window boundaries (one process here; the
2-rank DDP save-on-rank-0 / load-everywhere path runs in tests/launch/test_launch_files.py through torchrun)."""

from __future__ import annotations

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
