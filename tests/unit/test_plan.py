"""BatchPlan arithmetic and its error messages."""

from __future__ import annotations

import pytest

from distaccum import BatchPlan


def test_derives_accum_steps_from_global_and_micro():
    plan = BatchPlan(global_batch_size=1024, micro_batch_size=16, world_size=4)
    assert (plan.accum_steps, plan.global_batch_size, plan.micro_batch_size, plan.world_size) == (16, 1024, 16, 4)


def test_derives_micro_batch_size_from_global_and_accum():
    assert BatchPlan(global_batch_size=1024, accum_steps=8, world_size=4).micro_batch_size == 32


def test_derives_global_batch_size_from_micro_and_accum():
    assert BatchPlan(micro_batch_size=8, accum_steps=3, world_size=2).global_batch_size == 48


def test_accepts_three_consistent_sizes():
    assert BatchPlan(global_batch_size=48, micro_batch_size=8, accum_steps=3, world_size=2).accum_steps == 3


def test_world_size_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert BatchPlan(global_batch_size=64, micro_batch_size=4).world_size == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert BatchPlan(global_batch_size=64, micro_batch_size=4).world_size == 1


def test_str_prints_the_equation():
    plan = BatchPlan(global_batch_size=1024, micro_batch_size=16, world_size=4)
    assert str(plan) == "global_batch_size 1024 = accum_steps 16 x micro_batch_size 16 x world_size 4"


def test_indivisible_global_batch_prints_equation_and_nearest_valid():
    with pytest.raises(
        ValueError,
        match=r"global_batch_size 1000 .* micro_batch_size 16 x world_size 8 = 128 .*"
        r"nearest valid: 896 or 1024",
    ):
        BatchPlan(global_batch_size=1000, micro_batch_size=16, world_size=8)


def test_indivisible_global_batch_for_given_accum_steps():
    with pytest.raises(ValueError, match=r"multiple of accum_steps 3 x world_size 2 = 6; nearest valid: 96 or 102"):
        BatchPlan(global_batch_size=100, accum_steps=3, world_size=2)


def test_global_batch_smaller_than_one_micro_step_suggests_the_smallest_valid():
    with pytest.raises(ValueError, match=r"nearest valid: 32$"):
        BatchPlan(global_batch_size=8, micro_batch_size=16, world_size=2)


def test_inconsistent_three_sizes_print_the_product():
    with pytest.raises(ValueError, match=r"\(4 x 8 x 2 = 64\)"):
        BatchPlan(global_batch_size=100, micro_batch_size=8, accum_steps=4, world_size=2)


@pytest.mark.parametrize("value", [0, -4])
def test_zero_or_negative_size_names_the_field(value):
    with pytest.raises(ValueError, match=rf"micro_batch_size must be a positive integer \(>= 1\), got {value}"):
        BatchPlan(global_batch_size=64, micro_batch_size=value, world_size=1)


@pytest.mark.parametrize("value", [2.5, 16.0, "16", True])
def test_non_integer_size_names_the_field_and_type(value):
    with pytest.raises(ValueError, match=r"accum_steps must be a positive integer, got"):
        BatchPlan(global_batch_size=64, accum_steps=value, world_size=1)


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match=r"world_size must be a positive integer \(>= 1\), got 0"):
        BatchPlan(global_batch_size=64, micro_batch_size=4, world_size=0)


def test_fewer_than_two_sizes_is_an_error():
    with pytest.raises(ValueError, match=r"needs two of global_batch_size, micro_batch_size, accum_steps"):
        BatchPlan(global_batch_size=64, world_size=1)


def test_for_world_size_keeps_global_batch():
    plan = BatchPlan(global_batch_size=64, micro_batch_size=4, world_size=1)
    replanned = plan.for_world_size(4)
    assert (replanned.global_batch_size, replanned.micro_batch_size, replanned.accum_steps) == (64, 4, 4)
    assert replanned.for_world_size(1) == plan


def test_for_world_size_lists_valid_world_sizes_when_impossible():
    plan = BatchPlan(global_batch_size=48, micro_batch_size=4, world_size=1)
    with pytest.raises(ValueError, match=r"world_size 5 cannot keep .* valid world sizes: 1, 2, 3, 4, 6, 12"):
        plan.for_world_size(5)


def test_plan_is_frozen_and_round_trips_through_dict():
    plan = BatchPlan(global_batch_size=64, micro_batch_size=4, world_size=2)
    with pytest.raises(AttributeError):
        plan.accum_steps = 3  # type: ignore[misc]
    assert BatchPlan.from_dict(plan.as_dict()) == plan
