"""bf16 parameters under DDP x2 (gloo): float32 sums reduced once per window by hand, against one process on the real
batch in float64 and in bf16; the bf16 sums for contrast; DDP's buffer broadcast kept."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.precision_workers import (
    DDP_ACCUM,
    DDP_WINDOWS,
    ddp_buffers,
    ddp_windows,
    make_model,
    reference_grad,
    relative_error,
    window_batch,
)
from tests.helpers.spawn import run_ranks

WORLD = 2
PARAMS = sum(p.numel() for p in make_model().parameters())  # 16,641 in 4 tensors


@pytest.fixture(scope="module")
def runs() -> dict:
    return {name: run_ranks(ddp_windows, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", None))}


def references(dtype: torch.dtype) -> list[torch.Tensor]:
    model = make_model()
    return [reference_grad(model, *window_batch(w, n, WORLD), dtype) for w, n in enumerate(DDP_WINDOWS)]


def test_ranks_step_on_the_same_gradient(runs):
    for name, (first, second) in runs.items():
        assert first["steps"] == second["steps"] == len(DDP_WINDOWS), name
        for a, b in zip(first["grads"], second["grads"], strict=True):
            assert torch.equal(a, b), name


def test_float32_sums_match_the_real_batch_as_closely_as_one_bf16_backward_of_it(runs):
    in_float64, in_bf16 = references(torch.float64), references(torch.bfloat16)
    for window, (fp32, bf16, expected, one_backward) in enumerate(
        zip(runs["fp32"][0]["grads"], runs["bf16"][0]["grads"], in_float64, in_bf16, strict=True)
    ):
        high, low, floor = (
            relative_error(fp32, expected),
            relative_error(bf16, expected),
            relative_error(one_backward, expected),
        )
        # The short window too: its factor (16 x 2 / 10 micro-steps) is folded into the reduction, exactly.
        assert high <= 1.3 * floor, (window, high, floor)
        if DDP_WINDOWS[window] == DDP_ACCUM:
            assert high <= 0.8 * low, (window, high, low)


def test_one_float32_gradient_reduction_per_window_and_none_by_ddp(runs):
    for rank in runs["fp32"]:
        per_window: list[list] = []
        index = 0
        for micro_steps in DDP_WINDOWS:
            count = micro_steps + (micro_steps < DDP_ACCUM)  # the short window's flush reduces
            per_window.append(rank["reductions"][index : index + count])
            index += count
        for window in per_window:
            assert all(not reductions for reductions in window[:-1]), window  # nothing inside the window
            assert window[-1] == [(PARAMS + 4, "torch.float32")]  # one bucket: the sums and 4 "had a gradient" flags
        assert sum(rank["ddp_reductions"]) == 0


def test_bf16_sums_reduce_through_ddp_once_per_window(runs):
    for rank in runs["bf16"]:
        gradient_reductions = [r for r in rank["reductions"] if r]
        assert gradient_reductions == [[(PARAMS, "torch.bfloat16")]] * len(DDP_WINDOWS)
        assert sum(rank["ddp_reductions"]) == DDP_WINDOWS.count(DDP_ACCUM)  # the flush reduces by hand


def test_buffers_are_broadcast_from_rank_0_as_ddp_would():
    first, second = run_ranks(ddp_buffers, torch.float32)
    assert torch.equal(first, second)
    own_first, own_second = run_ranks(ddp_buffers, None)  # each rank's own statistics until DDP's next forward
    assert not torch.equal(own_first, own_second) and torch.equal(own_first, first)
