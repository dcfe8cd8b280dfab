"""The non-finite guard without a norm: a NaN in the gradient (not in the loss) of one rank skips the step on
every rank, checked where the gradient is touched anyway: in distaccum's DDP comm hook (fused with DDP's
division), at the step when the user's own comm hook is kept, and on each FSDP shard before the window's
all-reduce, which makes the decision global."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import nonfinite_workers as workers
from tests.helpers.spawn import run_ranks

CASES = [("ddp", False), ("ddp", True), ("fsdp1", False), ("fsdp2", False)]


@pytest.mark.parametrize(("backend", "user_hook"), CASES, ids=["ddp", "ddp-user-hook", "fsdp1", "fsdp2"])
def test_a_nan_gradient_on_one_rank_with_a_finite_loss_skips_the_step_on_every_rank(backend, user_hook):
    ranks = run_ranks(workers.nan_gradient_with_finite_loss, backend, user_hook, timeout_s=120)
    for result in ranks:
        skipped = [step["skipped"] for step in result["steps"]]
        assert skipped == [False, True, False], skipped
        poisoned = result["steps"][workers.POISONED - 1]
        assert math.isfinite(poisoned["loss"])  # the loss did not give it away: the gradient check did
        assert poisoned["grad_norm"] is None  # and no norm was computed for it (no clipping asked)
        before, after = result["weights"][0], result["weights"][1]
        assert all(torch.equal(before[name], after[name]) for name in before)  # the skipped step changed nothing
        assert all(torch.isfinite(value).all() for value in result["weights"][-1].values())
    finals = [result["weights"][-1] for result in ranks]
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])
    if backend == "ddp":
        first = ranks[0]
        # distaccum's hook reduced every window (one bucket each) unless the user's own hook was there first.
        assert first["hook_reductions"] == (None if user_hook else workers.WINDOWS)
        assert first["comm_hooks"] == 1
