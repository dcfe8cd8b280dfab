"""A mid-window checkpoint of 2 DDP ranks whose open windows differ per rank (``num_items`` counts, loss sums, a
window one rank discarded, the noise scale's small-batch reading), resumed on 2 ranks in fresh objects: the
resumed run equals the uninterrupted one (weights and every step's result) and the single-process real batch.

Before each rank kept its own window state, rank 0 alone wrote it and every rank loaded rank 0's (issue 24, rows 3
and 8): the item count of the resumed window was rank 0's twice, the loss sum too, rank 1's discard was lost.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers import checkpoint_combination_workers as workers
from tests.helpers.common import max_relative_error
from tests.helpers.spawn import run_ranks

EXACT = 1e-6  # same world size, same operations: in fact bit-identical
REAL_BATCH = 1e-5  # fp32, against one process on the real batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("combinations")
    return run_ranks(workers.mid_window_resumes, str(directory), timeout_s=120)


def _resumed_window(result: dict, part: str) -> dict:
    """The result of the window the checkpoint cut (the first step of the resumed run)."""
    steps = result[part]["steps"]
    return steps[workers.SAVE_AT[0]] if part == "uninterrupted" else steps[0]


def _same_steps(actual: list[dict], expected: list[dict], *, keys=("loss", "num_items", "skipped")) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        for key in keys:
            if isinstance(want[key], float) and math.isnan(want[key]):
                assert math.isnan(got[key]), (key, got, want)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), (key, got, want)


def test_num_items_that_differ_by_rank_resume_mid_window_exactly(runs):
    reference = workers.reference("items")
    window = _resumed_window(runs[1]["items"], "resumed")
    assert window["num_items"] == reference["steps"][workers.SAVE_AT[0]]["num_items"]  # both ranks' items
    for result in runs:
        items = result["items"]
        assert max_relative_error(items["resumed"]["final"], items["uninterrupted"]["final"]) <= EXACT
        assert max_relative_error(items["resumed"]["final"], reference["final"]) <= REAL_BATCH
        _same_steps(items["uninterrupted"]["steps"], reference["steps"])
        _same_steps(items["resumed"]["steps"], reference["steps"][workers.SAVE_AT[0] :])


def test_the_loss_of_a_window_resumed_without_num_items_is_every_ranks_mean(runs):
    reference = workers.reference("mean")
    for result in runs:
        mean = result["mean"]
        assert max_relative_error(mean["resumed"]["final"], reference["final"]) <= REAL_BATCH
        _same_steps(mean["resumed"]["steps"], reference["steps"][workers.SAVE_AT[0] :], keys=("loss",))


def test_a_window_one_rank_discarded_stays_discarded_after_a_mid_window_resume(runs):
    reference = workers.reference("discard")
    for result in runs:
        discard = result["discard"]
        assert _resumed_window(discard, "resumed")["skipped"]
        assert max_relative_error(discard["resumed"]["final"], discard["uninterrupted"]["final"]) <= EXACT
        assert max_relative_error(discard["resumed"]["final"], reference["final"]) <= REAL_BATCH


def test_the_noise_scale_keeps_each_ranks_small_batch_reading_across_a_mid_window_checkpoint(runs):
    for result in runs:
        for case in workers.CASES:
            resumed = [step["noise_scale"] for step in result[case]["resumed"]["steps"]]
            expected = [step["noise_scale"] for step in result[case]["uninterrupted"]["steps"]]
            assert None not in expected, case  # the estimate is defined at every step: a lost reading shows
            assert resumed == pytest.approx(expected[workers.SAVE_AT[0] :], rel=1e-9), case
