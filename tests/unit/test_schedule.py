"""BatchSchedule arithmetic (ramp-up), its errors, and what the accumulator does with it in one process."""

from __future__ import annotations

import math

import pytest
import torch

from distaccum import Accumulator, BatchPlan, BatchSchedule
from tests.helpers.common import loss_fn, make_model


def test_stages_hold_from_their_start_until_the_next():
    schedule = BatchSchedule([(0, 256), (2_000_000, 512), (6_000_000, 1024)], micro_batch_size=16, world_size=8)
    sizes = [schedule.plan_at(consumed).global_batch_size for consumed in (0, 1_999_999, 2_000_000, 5_999_999, 10**9)]
    assert sizes == [256, 256, 512, 512, 1024]
    assert [schedule.plan_at(c).accum_steps for c in (0, 2_000_000, 6_000_000)] == [2, 4, 8]


def test_linear_ramp_matches_megatrons_rampup_formula():
    start, increment, end, ramp = 32, 16, 128, 1000  # 6 increments over 1000 samples: not a whole number each
    schedule = BatchSchedule.linear(
        start=start, end=end, increment=increment, ramp_samples=ramp, micro_batch_size=4, world_size=4
    )
    per_increment = ramp / ((end - start) / increment)
    for consumed in range(0, 1500, 7):
        # Megatron's RampupBatchsizeNumMicroBatchesCalculator, written out independently.
        expected = min(start + int(consumed / per_increment) * increment, end)
        assert schedule.global_batch_size_at(consumed) == expected, consumed


def test_steps_unit_keys_on_optimizer_steps():
    schedule = BatchSchedule([(0, 8), (3, 16)], micro_batch_size=2, world_size=2, unit="steps")
    assert schedule.plan_at(consumed_samples=10**6, optimizer_steps=2).global_batch_size == 8
    assert schedule.plan_at(consumed_samples=0, optimizer_steps=3).global_batch_size == 16


def test_a_stage_that_does_not_divide_is_refused_with_the_equation():
    with pytest.raises(
        ValueError,
        match=r"stage \(1000 samples, 100\).*micro_batch_size 16 x world_size 4 = 64.*nearest valid: 64 or 128",
    ):
        BatchSchedule([(0, 64), (1000, 100)], micro_batch_size=16, world_size=4)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([(5, 8)], "must begin at 0"),
        ([(0, 8), (10, 16), (10, 32)], "strictly increase"),
        ([], "pairs"),
        ([(0, 8, 1)], "pairs"),
        ([(0, 0)], "global_batch_size must be a positive integer"),
    ],
)
def test_malformed_stages_are_refused(stages, message):
    with pytest.raises(ValueError, match=message):
        BatchSchedule(stages, micro_batch_size=2, world_size=1)


def test_linear_needs_a_whole_number_of_increments():
    with pytest.raises(ValueError, match=r"end - start must be a positive multiple of increment: 100 - 32 = 68"):
        BatchSchedule.linear(start=32, end=100, increment=16, ramp_samples=10, micro_batch_size=4, world_size=1)


def test_another_world_size_keeps_the_stages_or_says_which_stage_cannot():
    schedule = BatchSchedule([(0, 24), (64, 32)], micro_batch_size=4, world_size=2)
    assert schedule.for_world_size(1).plan_at(64).accum_steps == 8
    with pytest.raises(ValueError, match=r"stage \(64 samples, 32\).*micro_batch_size 4 x world_size 3 = 12"):
        schedule.for_world_size(3)


def test_dict_round_trip_and_fingerprint_ignore_only_the_world_size():
    schedule = BatchSchedule([(0, 16), (64, 48)], micro_batch_size=4, world_size=2)
    assert BatchSchedule.from_dict(schedule.as_dict()) == schedule
    assert schedule.for_world_size(4).fingerprint() == schedule.fingerprint()
    other = BatchSchedule([(0, 16), (65, 48)], micro_batch_size=4, world_size=2)
    assert other.fingerprint() != schedule.fingerprint()


def _accumulator(schedule_or_plan):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, Accumulator(model, optimizer, schedule_or_plan)


def _run(model, acc, micro_steps, micro=2):
    for _ in range(micro_steps):
        with acc.micro_step():
            acc.backward(loss_fn(model(torch.randn(micro, 8)), torch.randn(micro, 4)))


def test_accumulator_changes_accum_steps_only_at_window_boundaries():
    model, acc = _accumulator(BatchSchedule([(0, 4), (6, 8)], micro_batch_size=2, world_size=1))
    seen = []
    for _ in range(10):
        seen.append(acc.plan.accum_steps)
        _run(model, acc, 1)
    # windows: 2 (4 samples), 2 (8 consumed: the second stage starts), then 4, 4: the switch waits for the boundary
    assert seen == [2, 2, 2, 2, 4, 4, 4, 4, 4, 4]
    assert acc.optimizer_steps == 3 and acc.consumed_samples == 16


def test_consumed_samples_counts_short_windows_by_what_they_had():
    model, acc = _accumulator(BatchPlan(global_batch_size=8, micro_batch_size=2, world_size=1))
    _run(model, acc, 5)
    acc.flush()
    assert acc.consumed_samples == 8 + 2


def test_resuming_with_another_schedule_or_without_one_is_refused():
    model, acc = _accumulator(BatchSchedule([(0, 4), (6, 8)], micro_batch_size=2, world_size=1))
    _run(model, acc, 4)
    state = acc.state_dict()
    assert state["consumed_samples"] == 8 and state["schedule"]["stages"] == [[0, 4], [6, 8]]
    _, other = _accumulator(BatchSchedule([(0, 4), (100, 8)], micro_batch_size=2, world_size=1))
    with pytest.raises(ValueError, match="same schedule"):
        other.load_state_dict(state)
    _, plain = _accumulator(BatchPlan(global_batch_size=4, micro_batch_size=2, world_size=1))
    with pytest.raises(ValueError, match=r"checkpoint was made with plan \(global_batch_size 8"):
        plain.load_state_dict(state)  # its plan (global 8) is not the plain plan's 4
    _, scheduled = _accumulator(BatchSchedule([(0, 4)], micro_batch_size=2, world_size=1))
    plain_state = _accumulator(BatchPlan(global_batch_size=4, micro_batch_size=2, world_size=1))[1].state_dict()
    with pytest.raises(ValueError, match="without a batch schedule"):
        scheduled.load_state_dict(plain_state)


def test_a_state_without_consumed_samples_resumes_from_steps_times_the_batch():
    model, acc = _accumulator(BatchPlan(global_batch_size=4, micro_batch_size=2, world_size=1))
    _run(model, acc, 6)
    state = acc.state_dict()
    del state["consumed_samples"], state["schedule"]  # as a checkpoint from before schedules wrote it
    _, resumed = _accumulator(BatchPlan(global_batch_size=4, micro_batch_size=2, world_size=1))
    resumed.load_state_dict(state)
    assert resumed.consumed_samples == 12 and resumed.optimizer_steps == 3
    assert not math.isnan(resumed.consumed_samples)
