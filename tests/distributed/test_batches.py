"""Batches that change (issue 15), on real gloo ranks against one process on the real batches: a global batch that
ramps up (exact per step, resumable mid-ramp, also on another world size), and a micro-batch size found by
out-of-memory retries that every rank agrees on without hanging.

Data: one stream of samples, read by rank ``r`` interleaved (``r::W``, as ``DistributedSampler`` without
shuffling), so a plain loop over micro-batches that never looks at the plan hands every window of global batch ``G``
exactly the stream's next ``G`` samples.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, BatchSchedule, checkpoint
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, max_relative_error
from tests.helpers.spawn import run_ranks

RAMP_BATCHES = [8, 8, 16, 16, 32, 32]  # STAGES at 0, 16 and 48 consumed samples, worked out by hand

# Per-rank bodies (run in spawned processes under tests.helpers.spawn.run_ranks)

MICRO = 2
STAGES = [(0, 8), (16, 16), (48, 32)]  # samples consumed -> global batch; on 2 ranks accum_steps 2, 4, 8
RAMP_STEPS = 6  # global batches 8, 8, 16, 16, 32, 32: 112 samples
STREAM = 160


def stream() -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = make_data(1, STREAM)
    return inputs[0], targets[0]


def item_weights() -> torch.Tensor:
    """Items per sample of the stream (0 to 3: ragged, some micro-batches with none), for ``num_items`` runs."""
    return torch.randint(0, 4, (STREAM,), generator=torch.Generator().manual_seed(7)).double()


def item_loss(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of per-sample losses weighted by their items over the items (a token-mean loss), and the item count."""
    per_sample = (output - target).square().mean(dim=1)
    count = int(weights.sum())
    return (per_sample * weights.to(per_sample.dtype)).sum() / max(count, 1), count


def reference_weights(
    global_batches: list[int], optimizer_name: str = "sgd", items: bool = False
) -> dict[str, torch.Tensor]:
    """One process, real batches: the stream cut into consecutive batches of the given sizes."""
    model = make_model()
    optimizer = make_optimizer(optimizer_name, model.parameters())
    inputs, targets = stream()
    weights = item_weights()
    offset = 0
    for size in global_batches:
        optimizer.zero_grad()
        window = slice(offset, offset + size)
        if items:
            item_loss(model(inputs[window]), targets[window], weights[window])[0].backward()
        else:
            loss_fn(model(inputs[window]), targets[window]).backward()
        optimizer.step()
        offset += size
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _ramp_job(world_size: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Accumulator]:
    inner = make_model()
    model = nn.parallel.DistributedDataParallel(inner) if world_size > 1 else inner
    optimizer = make_optimizer("sgd", model.parameters())
    schedule = BatchSchedule(STAGES, micro_batch_size=MICRO)
    return inner, model, optimizer, Accumulator(model, optimizer, schedule)


def _train_ramp(rank: int, world_size: int, model: nn.Module, acc: Accumulator, until: int) -> list[int]:
    """A plain loop over this rank's micro-batches from where ``acc`` stands; the global batch of each step."""
    inputs, targets = stream()
    start = acc.consumed_samples // world_size  # this rank's position in its interleaved stream
    mine_x, mine_y = inputs[rank::world_size][start:], targets[rank::world_size][start:]
    batches = []
    for x, y in zip(mine_x.split(MICRO), mine_y.split(MICRO), strict=True):
        if acc.optimizer_steps == until:
            break
        window_batch = acc.plan.global_batch_size
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
        if acc.stepped:
            batches.append(window_batch)
    return batches


def ramp(rank: int, world_size: int) -> dict[str, Any]:
    """Uninterrupted ramp; then the same ramp stopped after 3 steps, checkpointed and resumed in a new job."""
    inner, model, _, acc = _ramp_job(world_size)
    batches = _train_ramp(rank, world_size, model, acc, RAMP_STEPS)
    uninterrupted = {name: value.detach().clone() for name, value in inner.state_dict().items()}

    with tempfile.TemporaryDirectory() if rank == 0 else contextlib.nullcontext() as directory:
        shared = [directory]
        if world_size > 1:
            torch.distributed.broadcast_object_list(shared)
        inner, model, optimizer, acc = _ramp_job(world_size)
        first = _train_ramp(rank, world_size, model, acc, 3)
        checkpoint.save(shared[0], model=model, optimizer=optimizer, accumulator=acc)
        inner, model, optimizer, acc = _ramp_job(world_size)  # a new job: its schedule starts at stage 0
        checkpoint.load(shared[0], model=model, optimizer=optimizer, accumulator=acc)
        resumed_plan = acc.plan.as_dict()
        resumed_consumed = acc.consumed_samples
        rest = _train_ramp(rank, world_size, model, acc, RAMP_STEPS)
        if world_size > 1:
            torch.distributed.barrier()  # rank 0 removes the directory only after every rank has read it
    return {
        "batches": batches,
        "uninterrupted": uninterrupted,
        "resumed_batches": first + rest,
        "resumed": {name: value.detach().clone() for name, value in inner.state_dict().items()},
        "resumed_plan": resumed_plan,
        "resumed_consumed": resumed_consumed,
        "consumed": acc.consumed_samples,
        "state": acc.state_dict(),
    }


def ramp_elastic(rank: int, world_size: int, saved: dict[str, Any]) -> dict[str, Any]:
    """Resume another world size's boundary state (weights, optimizer, accumulator) here, to the end of the ramp."""
    inner, model, optimizer, acc = _ramp_job(world_size)
    inner.load_state_dict({name: value.clone() for name, value in saved["model"].items()})
    # Arguments arrive in shared memory, the same tensors on every rank: private copies, or SGD's momentum buffers
    # would be one tensor updated by both ranks.
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    acc.load_state_dict(saved["accumulator"])
    plan = acc.plan.as_dict()
    batches = _train_ramp(rank, world_size, model, acc, RAMP_STEPS)
    return {"plan": plan, "batches": batches, "weights": {k: v.detach().clone() for k, v in inner.state_dict().items()}}


def ramp_state_after(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """Weights, optimizer and accumulator state at the boundary after ``steps`` steps of the ramp."""
    inner, model, optimizer, acc = _ramp_job(world_size)
    _train_ramp(rank, world_size, model, acc, steps)
    return {
        "model": {name: value.detach().clone() for name, value in inner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "accumulator": acc.state_dict(),
    }


# ----------------------------------------------------------------------------------------- automatic micro-batch
class FitsUpTo(nn.Module):
    """A model that raises ``torch.OutOfMemoryError`` when a forward sees more than ``limit`` samples, as a device
    would (on the ranks in ``ranks_short_of_memory`` only)."""

    def __init__(self, inner: nn.Module, limit: int, short: bool) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.short = short
        self.refused: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.short and x.shape[0] > self.limit:
            self.refused.append(x.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]} (test)")
        return self.inner(x)


OOM_GLOBAL = 48  # 24 samples per rank on 2 ranks
OOM_LARGEST = 12  # candidates dividing 24: 12, 8, 6, 4, 3, 2, 1
OOM_STEPS = 3


def oom(rank: int, world_size: int, short_ranks: tuple[int, ...], limit: int, items: bool = False) -> dict[str, Any]:
    """Three steps with ``auto_micro_batch`` where ranks in ``short_ranks`` fit at most ``limit`` samples per
    forward; then a fresh job resumed from the checkpoint (no search again)."""
    inner = make_model()
    fits = FitsUpTo(inner, limit, rank in short_ranks)
    # Tiny buckets: the gradients are reduced by hand at the boundary, bucket by bucket (several here).
    model = nn.parallel.DistributedDataParallel(fits, bucket_cap_mb=0.002) if world_size > 1 else fits
    optimizer = make_optimizer("sgd", model.parameters())
    plan = BatchPlan(global_batch_size=OOM_GLOBAL, micro_batch_size=OOM_LARGEST)
    acc = Accumulator(model, optimizer, plan, auto_micro_batch=True)
    inputs, targets = stream()
    weights = item_weights()
    share = OOM_GLOBAL // world_size
    sizes_per_step = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(OOM_STEPS):
            window = slice(step * OOM_GLOBAL, (step + 1) * OOM_GLOBAL)
            x, y, w = (t[window][rank::world_size] for t in (inputs, targets, weights))
            assert x.shape[0] == share
            for micro_x, micro_y, micro_w in acc.split((x, y, w)):
                with acc.micro_step():
                    if items:
                        loss, count = item_loss(model(micro_x), micro_y, micro_w)
                        acc.backward(loss, num_items=count)
                    else:
                        acc.backward(loss_fn(model(micro_x), micro_y))
            sizes_per_step.append(acc.plan.micro_batch_size)
    state = acc.state_dict()
    resumed = Accumulator(model, optimizer, plan, auto_micro_batch=True)
    resumed.load_state_dict(state)
    return {
        "weights": {name: value.detach().clone() for name, value in inner.state_dict().items()},
        "sizes": sizes_per_step,
        "refused": fits.refused,
        "retries": acc.micro_batch_retries,
        "steps": acc.optimizer_steps,
        "skipped": acc.skipped_steps,
        "warnings": [str(w.message) for w in caught if "auto_micro_batch" in str(w.message)],
        "resumed_micro": resumed.plan.micro_batch_size,
        "resumed_accum": resumed.plan.accum_steps,
    }


# Tests


@pytest.fixture(scope="module")
def ramp_on_two_ranks():
    return run_ranks(ramp, world_size=2, timeout_s=180)


def test_ramp_steps_each_global_batch_of_the_schedule_exactly(ramp_on_two_ranks):
    reference = reference_weights(RAMP_BATCHES)
    for result in ramp_on_two_ranks:
        assert result["batches"] == RAMP_BATCHES
        assert max_relative_error(result["uninterrupted"], reference) <= 1e-6
        assert result["consumed"] == sum(RAMP_BATCHES)
    # The reference is not trivially close to a run at a constant batch: the ramp is what made it match.
    assert max_relative_error(ramp_on_two_ranks[0]["uninterrupted"], reference_weights([8] * 6)) > 1e-3


def test_ramp_resumed_from_a_checkpoint_goes_on_where_it_was_not_from_its_start(ramp_on_two_ranks):
    reference = reference_weights(RAMP_BATCHES)
    for result in ramp_on_two_ranks:
        # Saved after 3 steps (8 + 8 + 16 = 32 samples): the new job is in the second stage, not back at 8.
        assert result["resumed_consumed"] == 32
        assert result["resumed_plan"]["global_batch_size"] == 16
        assert result["resumed_plan"]["accum_steps"] == 4
        assert result["resumed_batches"] == RAMP_BATCHES
        assert max_relative_error(result["resumed"], reference) <= 1e-6
        assert result["state"]["schedule"]["stages"] == [list(stage) for stage in STAGES]


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_ramp_resumes_mid_ramp_on_another_world_size(saved_on, resumed_on):
    saved = run_ranks(ramp_state_after, 3, world_size=saved_on, timeout_s=120)[0]
    assert saved["accumulator"]["consumed_samples"] == 32
    results = run_ranks(ramp_elastic, saved, world_size=resumed_on, timeout_s=120)
    reference = reference_weights(RAMP_BATCHES)
    for result in results:
        assert result["plan"]["global_batch_size"] == 16
        assert result["plan"]["accum_steps"] == 16 // (MICRO * resumed_on)
        assert result["batches"] == RAMP_BATCHES[3:]
        assert max_relative_error(result["weights"], reference) <= 1e-6


@pytest.mark.parametrize(
    ("short_ranks", "limit", "expected_size"),
    [((1,), 6, 6), ((0, 1), 5, 4), ((), 12, 12)],
    ids=["oom-on-one-rank", "oom-on-both-ranks", "no-oom"],
)
def test_oom_makes_every_rank_agree_on_the_largest_size_that_fits(short_ranks, limit, expected_size):
    results = run_ranks(oom, short_ranks, limit, world_size=2, timeout_s=120)
    reference = reference_weights([OOM_GLOBAL] * OOM_STEPS)
    tried = [size for size in (12, 8, 6, 4, 3, 2, 1) if size >= expected_size]
    for rank, result in enumerate(results):
        # Both ranks settle on the same size, the largest divisor of the 24-sample share that fits, found in the
        # first window and kept; no step skipped, and the weights are the real batch's.
        assert result["sizes"] == [expected_size] * OOM_STEPS
        assert result["retries"] == len(tried) - 1
        assert len(result["warnings"]) == len(tried) - 1
        assert result["steps"] == OOM_STEPS and result["skipped"] == 0
        assert max_relative_error(result["weights"], reference) <= 1e-6
        # The checkpointed size is used again on resume, without a new search.
        assert result["resumed_micro"] == expected_size
        assert result["resumed_accum"] == OOM_GLOBAL // 2 // expected_size
        if rank in short_ranks:
            assert result["refused"] and max(result["refused"]) == max(tried) and min(result["refused"]) > limit
        else:
            assert result["refused"] == []


def test_oom_with_num_items_keeps_the_exact_item_weighting():
    # Ragged items (0 to 3 per sample) and a first window whose items-per-micro-step scale no rank knows yet: in
    # this mode the ranks agree on it at the boundary, not inside the window where a peer may have stopped.
    results = run_ranks(oom, (1,), 6, True, world_size=2, timeout_s=120)
    reference = reference_weights([OOM_GLOBAL] * OOM_STEPS, items=True)
    for result in results:
        assert result["sizes"] == [6] * OOM_STEPS
        assert max_relative_error(result["weights"], reference) <= 1e-6
    assert max_relative_error(results[0]["weights"], reference_weights([OOM_GLOBAL] * 3)) > 1e-3


def test_oom_even_at_one_sample_raises_on_every_rank_instead_of_hanging():
    with pytest.raises(AssertionError) as failure:
        run_ranks(oom, (1,), 0, world_size=2, timeout_s=120)
    text = str(failure.value)
    assert text.count("no smaller size") == 2, text  # rank 0, which never ran out itself, raises too
    assert "--- rank 0 failed" in text and "--- rank 1 failed" in text


def test_oom_in_one_process_retries_smaller():
    result = run_ranks(oom, (0,), 7, world_size=1, timeout_s=120)[0]
    # One process, share 48: candidates 12, 8, 6, ...: 12 fails, 8 fails (> 7), 6 fits.
    assert result["sizes"] == [6] * OOM_STEPS
    assert max_relative_error(result["weights"], reference_weights([OOM_GLOBAL] * OOM_STEPS)) <= 1e-6
    assert torch.is_tensor(next(iter(result["weights"].values())))
