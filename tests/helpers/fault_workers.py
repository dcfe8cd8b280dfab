"""Rank functions for tests/distributed/test_faults.py: interrupted, resized, non-finite and uneven runs on real
gloo ranks.

The functions taking ``(rank, world_size, ...)`` run under ``tests.helpers.spawn.run_ranks``. Run as a
module (``python -m tests.helpers.fault_workers CASE TIMEOUT_S``) this file is one rank of a job whose rendezvous comes
from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), where rank 1 misbehaves at micro-step
``FAULT_AT`` and rank 0 prints one JSON line saying how it ended.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, dist
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer

MICRO = 4
ACCUM = 3  # on 2 ranks: global batch 24
STEPS = 3
FAULT_AT = 5


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {name: value.detach().clone() for name, value in state.items()}


def rank_slice(step: int, rank: int, world_size: int, global_batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """This rank's micro-batches of step ``step``: the same samples in the same order for any world size."""
    inputs, targets = make_data(STEPS + 2, global_batch_size)
    per_rank = global_batch_size // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return list(zip(inputs[step][mine].split(MICRO), targets[step][mine].split(MICRO), strict=True))


def _build(world_size: int, global_batch_size: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Accumulator]:
    inner = make_model()
    model = nn.parallel.DistributedDataParallel(inner) if world_size > 1 else inner
    optimizer = make_optimizer("adam", model.parameters())
    plan = BatchPlan(global_batch_size=global_batch_size, micro_batch_size=MICRO)
    return inner, model, optimizer, Accumulator(model, optimizer, plan)


def _train(
    rank: int,
    world_size: int,
    model: nn.Module,
    acc: Accumulator,
    start: tuple[int, int] = (0, 0),
    on_micro_step: Any = None,
) -> None:
    """Train from data position ``start`` = (optimizer step, micro-batch in window) to the end of STEPS."""
    first_step, first_index = start
    for step in range(first_step, STEPS):
        batches = rank_slice(step, rank, world_size, acc.plan.global_batch_size)
        for index in range(first_index if step == first_step else 0, len(batches)):
            x, y = batches[index]
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
            if on_micro_step is not None:
                on_micro_step(step, index + 1)


# ------------------------------------------------------------------------------------ exact resume mid-window
def save_at_every_micro_step(rank: int, world_size: int) -> dict[str, Any]:
    """An uninterrupted run that snapshots its full state after every micro-step (what a checkpoint would hold)."""
    inner, model, optimizer, acc = _build(world_size, MICRO * ACCUM * world_size)
    snapshots: list[dict[str, Any]] = []

    def snapshot(step: int, done_in_window: int) -> None:
        position = (step + 1, 0) if done_in_window == ACCUM else (step, done_in_window)
        snapshots.append(
            {
                "model": _clone(inner.state_dict()),
                # optimizer.state_dict() references the live tensors that the next steps change in place
                "optimizer": torch.load(_roundtrip(optimizer.state_dict()), weights_only=False),
                "accumulator": acc.state_dict(include_grads=True),
                "position": position,
            }
        )

    _train(rank, world_size, model, acc, on_micro_step=snapshot)
    return {"final": _clone(inner.state_dict()), "snapshots": snapshots}


def _roundtrip(value: Any) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def resume_from_snapshots(rank: int, world_size: int, per_rank_snapshots: list[list[dict[str, Any]]]) -> dict:
    """Resume in fresh processes from each snapshot of this rank; also once without the saved gradients."""
    finals = []
    per_rank_snapshots = torch.load(_roundtrip(per_rank_snapshots), weights_only=False)  # see elastic_run
    for snapshot in per_rank_snapshots[rank]:
        inner, model, optimizer, acc = _build(world_size, MICRO * ACCUM * world_size)
        inner.load_state_dict(snapshot["model"])
        optimizer.load_state_dict(snapshot["optimizer"])
        acc.load_state_dict(snapshot["accumulator"])
        _train(rank, world_size, model, acc, start=snapshot["position"])
        finals.append(_clone(inner.state_dict()))
    # The same mid-window resume without the gradients: shows the test above can fail.
    snapshot = per_rank_snapshots[rank][1]
    inner, model, optimizer, acc = _build(world_size, MICRO * ACCUM * world_size)
    inner.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    state = {key: value for key, value in snapshot["accumulator"].items() if key != "grads"}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.load_state_dict(state)
    _train(rank, world_size, model, acc, start=snapshot["position"])
    return {"finals": finals, "without_grads": _clone(inner.state_dict()), "warnings": [str(w.message) for w in caught]}


# ----------------------------------------------------------------------------------- the checkpoint helper
def wrap(backend: str, model: nn.Module, world_size: int) -> nn.Module:
    if backend == "plain":
        return model
    if backend == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return _clone(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))


def train_with_checkpoint(
    rank: int, world_size: int, backend: str, directory: str, save_at: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """Train to the end through distaccum.checkpoint: saving at data position ``save_at``, or (None) resuming
    from the newest checkpoint in ``directory`` with the plan it gives for this world size."""
    from distaccum import checkpoint

    plan = checkpoint.resume_plan(directory) if save_at is None else None
    plan = plan or BatchPlan(global_batch_size=MICRO * ACCUM * 2, micro_batch_size=MICRO)
    model = wrap(backend, make_model(), world_size)
    optimizer = make_optimizer("adam", model.parameters())
    acc = Accumulator(model, optimizer, plan)
    objects = {"model": model, "optimizer": optimizer, "accumulator": acc}
    start = (0, 0)
    if save_at is None:
        data = checkpoint.load(directory, **objects)
        assert data is not None
        start = (data["step"], data["micro_batch"])

    def maybe_save(step: int, done_in_window: int) -> None:
        position = (step + 1, 0) if done_in_window == acc.plan.accum_steps else (step, done_in_window)
        if position == save_at:
            data_state = {"step": position[0], "micro_batch": position[1]}
            checkpoint.save(directory, **objects, data_state=data_state, include_grads=True)

    _train(rank, world_size, model, acc, start=start, on_micro_step=maybe_save)
    return full_state(model)


def checkpoint_roundtrips(rank: int, world_size: int, directory: str) -> dict[str, dict[str, Any]]:
    """DDP saved mid-window and FSDP2 saved at a boundary: uninterrupted run, then fresh objects resumed."""
    results = {}
    for backend, save_at in (("ddp", (1, 2)), ("fsdp2", (1, 0))):
        target = f"{directory}/{backend}"
        uninterrupted = train_with_checkpoint(rank, world_size, backend, target, save_at)
        resumed = train_with_checkpoint(rank, world_size, backend, target, None)
        results[backend] = {"uninterrupted": uninterrupted, "resumed": resumed}
    return results


# ---------------------------------------------------------------------------------------- elastic world size
def elastic_run(rank: int, world_size: int, foreign_boundary_state: dict[str, Any], boundary_step: int) -> dict:
    """(a) uninterrupted run on this world size, keeping its state at ``boundary_step``; (b) a resume of a
    boundary state saved by a job of another world size, trained to the end here."""
    global_batch_size = MICRO * ACCUM * 2
    inner, model, optimizer, acc = _build(world_size, global_batch_size)
    kept: dict[str, Any] = {}

    def keep(step: int, done_in_window: int) -> None:
        if acc.stepped and acc.optimizer_steps == boundary_step:
            kept.update(
                model=_clone(inner.state_dict()),
                optimizer=torch.load(_roundtrip(optimizer.state_dict()), weights_only=False),
                accumulator=acc.state_dict(include_grads=True),
            )

    _train(rank, world_size, model, acc, on_micro_step=keep)
    uninterrupted = _clone(inner.state_dict())
    # Arguments arrive in shared memory, the same tensors on both ranks, and optimizer.load_state_dict keeps the
    # tensors it is given: without a private copy both ranks' Adam would update one shared state twice per step.
    foreign_boundary_state = torch.load(_roundtrip(foreign_boundary_state), weights_only=False)
    inner, model, optimizer, acc = _build(world_size, global_batch_size)
    inner.load_state_dict(foreign_boundary_state["model"])
    optimizer.load_state_dict(foreign_boundary_state["optimizer"])
    acc.load_state_dict(foreign_boundary_state["accumulator"])
    resumed_accum_steps = acc.plan.accum_steps
    _train(rank, world_size, model, acc, start=(boundary_step, 0))
    return {
        "uninterrupted": uninterrupted,
        "boundary_state": kept,
        "resumed": _clone(inner.state_dict()),
        "resumed_accum_steps": resumed_accum_steps,
        "steps": acc.optimizer_steps,
    }


# ------------------------------------------------------------------------------------------------- non-finite
def nan_on_one_rank(rank: int, world_size: int) -> dict:
    """Window 2's first micro-batch is NaN on rank 1 only: skip mode, then raise mode on a second model."""
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    inputs, targets = make_data(2 * STEPS, MICRO)
    results: dict[str, Any] = {}
    for mode in ("skip", "raise"):
        model = nn.parallel.DistributedDataParallel(make_model())
        acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan, on_nonfinite=mode)
        after_step = []
        try:
            for index in range(2 * STEPS):
                with acc.micro_step():
                    loss = loss_fn(model(inputs[index]), targets[index])
                    if rank == 1 and index == 2:
                        loss = loss * float("nan")
                    acc.backward(loss)
                if acc.stepped:
                    after_step.append((acc.last_step, _clone(model.module.state_dict())))
            results[mode] = {"after_step": after_step, "skipped_steps": acc.skipped_steps}
        except FloatingPointError as error:
            results[mode] = {"error": str(error), "steps": (acc.optimizer_steps, acc.skipped_steps)}
    return results


class TwoBranches(nn.Module):
    """``a(x) + b(x)``: one FSDP1 flat parameter whose first half (``a``) is rank 0's shard and second half
    (``b``) rank 1's, so a loss term on ``b`` alone overflows one rank's shard only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.b(x)
        return self.a(x) + branch, branch


def overflow_on_one_fsdp1_shard(rank: int, world_size: int) -> dict:
    """FSDP1 + torch.amp.GradScaler; window 2's gradient is inf in rank 1's shard only."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(TwoBranches(), device_id=torch.device("cpu"), use_orig_params=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan, grad_scaler=scaler)
    inputs, targets = make_data(2 * STEPS, MICRO)
    report: dict[str, Any] = {"skipped": [], "scale": [], "local_weights": []}
    for index in range(2 * STEPS):
        with acc.micro_step():
            out, branch = model(inputs[index])
            loss = loss_fn(out, targets[index])
            if rank == 1 and index == 2:
                loss = loss + float("inf") * branch.sum()  # reaches b's gradient only
            acc.backward(loss)
        if acc.stepped:
            report["skipped"].append(acc.last_step.skipped)
            report["scale"].append(scaler.get_scale())
            report["local_weights"].append([p.detach().clone() for p in model.parameters()])
    return report


def exception_on_one_rank(rank: int, world_size: int, fail_index: int) -> dict:
    """Rank 1's block raises after its backward at micro-step ``fail_index`` of window 2; the loop catches it."""
    model = nn.parallel.DistributedDataParallel(make_model())
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    )
    inputs, targets = make_data(2 * STEPS, MICRO)
    skipped = []
    for index in range(2 * STEPS):
        try:
            with acc.micro_step():
                acc.backward(loss_fn(model(inputs[index]), targets[index]))
                if rank == 1 and index == 2 + fail_index:
                    raise KeyError("a user error after the backward")
        except KeyError:
            pass
        if acc.stepped:
            skipped.append(acc.last_step.skipped)
    return {"skipped": skipped, "weights": _clone(model.module.state_dict())}


# ------------------------------------------------------------------------------------------------ uneven data
def uneven_data(rank: int, world_size: int, counts: tuple[int, int]) -> dict:
    """Rank r has ``counts[r]`` micro-batches, fed through a generator (no len) and ``acc.iterate``; both modes."""
    inputs, targets = make_data(max(counts), MICRO, seed=10 + rank)
    results = {}
    for drop_last in (False, True):
        model = nn.parallel.DistributedDataParallel(make_model())
        plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
        acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan)
        read = []

        def loader(read: list[int] = read):
            for index in range(counts[rank]):
                read.append(index)
                yield inputs[index], targets[index]

        steps = []
        for x, y in acc.iterate(loader(), drop_last=drop_last):
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
            if acc.stepped:
                steps.append(acc.last_step.micro_steps)
        results[drop_last] = {
            "state": _clone(model.module.state_dict()),
            "micro_steps_per_step": steps,
            "dropped": acc.dropped_micro_batches,
            "read": len(read),
        }
    return results


# ------------------------------------------------------------------------------------------- disagreements
def disagreements(rank: int, world_size: int) -> list[str]:
    """Two ways ranks can drift apart, each caught on every rank; returns the messages in order."""
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    inputs, targets = make_data(4, MICRO)
    messages = []

    def fresh(check_ranks: bool = True) -> tuple[nn.Module, Accumulator]:
        model = nn.parallel.DistributedDataParallel(make_model())
        return model, Accumulator(model, make_optimizer("sgd", model.parameters()), plan, check_ranks=check_ranks)

    # 1. rank 1 resumed from another checkpoint: one micro-step further into the window.
    model, acc = fresh()
    state = acc.state_dict()
    if rank == 1:
        state.update(micro_step=1, grads=[torch.zeros_like(p) for p in model.parameters()])
    acc.load_state_dict(state)
    # 2. start-up check turned off and rank 1 at another optimizer step: caught at the first boundary.
    model2, acc2 = fresh(check_ranks=False)
    if rank == 1:
        acc2.load_state_dict({**acc2.state_dict(), "optimizer_steps": 7})
    cases = (
        (model, acc, lambda loss: acc.backward(loss)),
        (model2, acc2, lambda loss: acc2.backward(loss)),
    )
    for case_model, case_acc, backward in cases:
        try:
            for index in range(2):
                with case_acc.micro_step():
                    backward(loss_fn(case_model(inputs[index]), targets[index]))
            messages.append("no error")
        except RuntimeError as error:
            messages.append(str(error))
    return messages


# ----------------------------------------------------------------------------- a rank that dies or stalls
def _misbehaving_job(case: str) -> None:
    rank = dist.rank()
    model = nn.parallel.DistributedDataParallel(make_model())
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    )
    inputs, targets = make_data(4 * FAULT_AT, MICRO)
    last_progress = time.monotonic()
    try:
        for index in range(4 * FAULT_AT):
            if rank == 1 and index == FAULT_AT:
                if case == "stall":
                    time.sleep(600)  # the test kills it long before
                elif case == "exit":
                    os._exit(3)
                elif case == "flush":  # a hand-written loop whose data ended early on this rank
                    acc.flush()
                    time.sleep(600)
            with acc.micro_step():
                acc.backward(loss_fn(model(inputs[index]), targets[index]))
            last_progress = time.monotonic()
    except Exception as error:
        report = {"rank": rank, "seconds_waited": time.monotonic() - last_progress, "error": str(error)[:400]}
        print(json.dumps(report), flush=True)
        raise


if __name__ == "__main__":
    dist.init(timeout_s=float(sys.argv[2]))
    dist.run(_misbehaving_job, sys.argv[1])
