"""Batches that change (issue 15), on real gloo ranks against one process on the real batches: a global batch that
ramps up (exact per step, resumable mid-ramp, also on another world size), and a micro-batch size found by
out-of-memory retries that every rank agrees on without hanging."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import batch_workers as workers
from tests.helpers.common import max_relative_error
from tests.helpers.spawn import run_ranks

RAMP_BATCHES = [8, 8, 16, 16, 32, 32]  # STAGES at 0, 16 and 48 consumed samples, worked out by hand


@pytest.fixture(scope="module")
def ramp_on_two_ranks():
    return run_ranks(workers.ramp, world_size=2, timeout_s=180)


def test_ramp_steps_each_global_batch_of_the_schedule_exactly(ramp_on_two_ranks):
    reference = workers.reference(RAMP_BATCHES)
    for result in ramp_on_two_ranks:
        assert result["batches"] == RAMP_BATCHES
        assert max_relative_error(result["uninterrupted"], reference) <= 1e-6
        assert result["consumed"] == sum(RAMP_BATCHES)
    # The reference is not trivially close to a run at a constant batch: the ramp is what made it match.
    assert max_relative_error(ramp_on_two_ranks[0]["uninterrupted"], workers.reference([8] * 6)) > 1e-3


def test_ramp_resumed_from_a_checkpoint_goes_on_where_it_was_not_from_its_start(ramp_on_two_ranks):
    reference = workers.reference(RAMP_BATCHES)
    for result in ramp_on_two_ranks:
        # Saved after 3 steps (8 + 8 + 16 = 32 samples): the new job is in the second stage, not back at 8.
        assert result["resumed_consumed"] == 32
        assert result["resumed_plan"]["global_batch_size"] == 16
        assert result["resumed_plan"]["accum_steps"] == 4
        assert result["resumed_batches"] == RAMP_BATCHES
        assert max_relative_error(result["resumed"], reference) <= 1e-6
        assert result["state"]["schedule"]["stages"] == [list(stage) for stage in workers.STAGES]


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_ramp_resumes_mid_ramp_on_another_world_size(saved_on, resumed_on):
    saved = run_ranks(workers.ramp_state_after, 3, world_size=saved_on, timeout_s=120)[0]
    assert saved["accumulator"]["consumed_samples"] == 32
    results = run_ranks(workers.ramp_elastic, saved, world_size=resumed_on, timeout_s=120)
    reference = workers.reference(RAMP_BATCHES)
    for result in results:
        assert result["plan"]["global_batch_size"] == 16
        assert result["plan"]["accum_steps"] == 16 // (workers.MICRO * resumed_on)
        assert result["batches"] == RAMP_BATCHES[3:]
        assert max_relative_error(result["weights"], reference) <= 1e-6


@pytest.mark.parametrize(
    ("short_ranks", "limit", "expected_size"),
    [((1,), 6, 6), ((0, 1), 5, 4), ((), 12, 12)],
    ids=["oom-on-one-rank", "oom-on-both-ranks", "no-oom"],
)
def test_oom_makes_every_rank_agree_on_the_largest_size_that_fits(short_ranks, limit, expected_size):
    results = run_ranks(workers.oom, short_ranks, limit, world_size=2, timeout_s=120)
    reference = workers.reference([workers.OOM_GLOBAL] * workers.OOM_STEPS)
    tried = [size for size in (12, 8, 6, 4, 3, 2, 1) if size >= expected_size]
    for rank, result in enumerate(results):
        # Both ranks settle on the same size, the largest divisor of the 24-sample share that fits, found in the
        # first window and kept; no step skipped, and the weights are the real batch's.
        assert result["sizes"] == [expected_size] * workers.OOM_STEPS
        assert result["retries"] == len(tried) - 1
        assert len(result["warnings"]) == len(tried) - 1
        assert result["steps"] == workers.OOM_STEPS and result["skipped"] == 0
        assert max_relative_error(result["weights"], reference) <= 1e-6
        # The checkpointed size is used again on resume, without a new search.
        assert result["resumed_micro"] == expected_size
        assert result["resumed_accum"] == workers.OOM_GLOBAL // 2 // expected_size
        if rank in short_ranks:
            assert result["refused"] and max(result["refused"]) == max(tried) and min(result["refused"]) > limit
        else:
            assert result["refused"] == []


def test_oom_with_num_items_keeps_the_exact_item_weighting():
    # Ragged items (0 to 3 per sample) and a first window whose items-per-micro-step scale no rank knows yet: in
    # this mode the ranks agree on it at the boundary, not inside the window where a peer may have stopped.
    results = run_ranks(workers.oom, (1,), 6, True, world_size=2, timeout_s=120)
    reference = workers.reference([workers.OOM_GLOBAL] * workers.OOM_STEPS, items=True)
    for result in results:
        assert result["sizes"] == [6] * workers.OOM_STEPS
        assert max_relative_error(result["weights"], reference) <= 1e-6
    assert max_relative_error(results[0]["weights"], workers.reference([workers.OOM_GLOBAL] * 3)) > 1e-3


def test_oom_even_at_one_sample_raises_on_every_rank_instead_of_hanging():
    with pytest.raises(AssertionError) as failure:
        run_ranks(workers.oom, (1,), 0, world_size=2, timeout_s=120)
    text = str(failure.value)
    assert text.count("no smaller size") == 2, text  # rank 0, which never ran out itself, raises too
    assert "--- rank 0 failed" in text and "--- rank 1 failed" in text


def test_oom_in_one_process_retries_smaller():
    result = run_ranks(workers.oom, (0,), 7, world_size=1, timeout_s=120)[0]
    # One process, share 48: candidates 12, 8, 6, ...: 12 fails, 8 fails (> 7), 6 fits.
    assert result["sizes"] == [6] * workers.OOM_STEPS
    assert max_relative_error(result["weights"], workers.reference([workers.OOM_GLOBAL] * workers.OOM_STEPS)) <= 1e-6
    assert torch.is_tensor(next(iter(result["weights"].values())))
