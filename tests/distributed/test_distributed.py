"""Behaviour that needs real ranks (2 gloo processes): flush, clipping, and failing fast instead of hanging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, max_relative_error, rank_micro_batches
from tests.helpers.spawn import run_ranks

MICRO = 4


def ddp_flush_and_clip(rank: int, world_size: int) -> dict:
    """Window 1 full (accum 3 x 2 ranks), then the data ends after 2 micro-steps per rank; clipping on."""
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = make_optimizer("adam", model.parameters())
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=3)
    acc = Accumulator(model, optimizer, plan, max_grad_norm=0.05)
    inputs, targets = make_data(2, plan.global_batch_size)
    for x, y in rank_micro_batches(inputs[0], targets[0], rank, world_size, MICRO):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    short = 2 * MICRO * world_size
    for x, y in rank_micro_batches(inputs[1][:short], targets[1][:short], rank, world_size, MICRO):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    norms = [acc.last_step.grad_norm]
    result = acc.flush()
    norms.append(result.grad_norm)
    return {
        "state": {k: v.clone() for k, v in model.module.state_dict().items()},
        "norms": norms,
        "micro_steps": result.micro_steps,
        "loss": result.loss,
    }


def test_ddp_flushed_short_window_and_clipping_match_the_real_batch():
    ranks = run_ranks(ddp_flush_and_clip)
    inputs, targets = make_data(2, 24)
    reference = make_model()
    optimizer = make_optimizer("adam", reference.parameters())
    norms, losses = [], []
    for batch_inputs, batch_targets in ((inputs[0], targets[0]), (inputs[1][:16], targets[1][:16])):
        optimizer.zero_grad()
        loss = loss_fn(reference(batch_inputs), batch_targets)
        loss.backward()
        losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)))
        optimizer.step()
    for result in ranks:
        assert result["micro_steps"] == 4  # 2 per rank
        assert result["norms"] == pytest.approx(norms, rel=1e-5)
        assert result["loss"] == pytest.approx(losses[1], rel=1e-6)
        assert max_relative_error(result["state"], reference.state_dict()) <= 1e-6


def disagreeing_plans(rank: int, world_size: int) -> None:
    model = nn.parallel.DistributedDataParallel(make_model())
    # Rank 1 was started with another --micro-batch-size: without the check it would hang at the first step.
    plan = BatchPlan(global_batch_size=32, micro_batch_size=4 if rank == 0 else 8)
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan)
    inputs, targets = make_data(1, plan.micro_batch_size)
    with acc.micro_step():
        acc.backward(loss_fn(model(inputs[0]), targets[0]))


def test_ranks_with_different_plans_fail_fast_on_every_rank():
    with pytest.raises(AssertionError) as failure:
        run_ranks(disagreeing_plans, timeout_s=60)
    message = str(failure.value)
    assert "--- rank 0 failed" in message and "--- rank 1 failed" in message
    assert "rank 1 has micro_batch_size=8 where rank 0 has 4; rank 1 has accum_steps=2 where rank 0 has 4" in message


def unwrapped_model(rank: int, world_size: int) -> None:
    model = make_model()
    Accumulator(model, make_optimizer("sgd", model.parameters()), BatchPlan(global_batch_size=16, micro_batch_size=4))


def test_unwrapped_model_on_two_ranks_is_refused():
    with pytest.raises(AssertionError, match=r"(?s)rank 0 failed.*gradients would never be averaged"):
        run_ranks(unwrapped_model, timeout_s=60)


def plan_for_one_rank(rank: int, world_size: int) -> None:
    model = nn.parallel.DistributedDataParallel(make_model())
    plan = BatchPlan(global_batch_size=16, micro_batch_size=4, world_size=1)
    Accumulator(model, make_optimizer("sgd", model.parameters()), plan)


def test_plan_that_disagrees_with_live_world_size_is_refused():
    with pytest.raises(AssertionError, match=r"plan.world_size is 1 but this job runs 2 rank\(s\)"):
        run_ranks(plan_for_one_rank, timeout_s=60)


def num_items_on_one_rank_only(rank: int, world_size: int) -> None:
    model = nn.parallel.DistributedDataParallel(make_model())
    plan = BatchPlan(global_batch_size=16, micro_batch_size=4)
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan)
    inputs, targets = make_data(1, 4)
    with acc.micro_step():
        loss = loss_fn(model(inputs[0]), targets[0])
        acc.backward(loss, num_items=4) if rank == 0 else acc.backward(loss)


def test_num_items_on_some_ranks_only_fails_on_every_rank():
    with pytest.raises(AssertionError) as failure:
        run_ranks(num_items_on_one_rank_only, timeout_s=60)
    message = str(failure.value)
    assert "--- rank 0 failed" in message and "--- rank 1 failed" in message
    assert "1 of 2 ranks gave num_items to acc.backward() and the others did not (this rank did)" in message
    assert "(this rank did not)" in message
