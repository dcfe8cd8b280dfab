"""Exact token weighting with ``num_items``: a tiny causal LM on ragged padded sequences equals the real batch.

The reference is one process taking one optimizer step per whole batch on the global token-mean loss.
The distributed runs use 2 real gloo ranks x accum_steps 3 with very unbalanced token counts across
micro-batches and ranks (``tests/helpers/lm.py:LENGTHS``, 0 to 24 tokens per micro-batch, all-padding micro-batches
included); single process runs the same 12 sequences as 6 micro-batches. Each backend runs all of its cases
in one spawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as torch_dist

from distaccum import Accumulator, BatchPlan
from tests.helpers import lm
from tests.helpers.common import max_relative_error
from tests.helpers.spawn import run_ranks
from tests.helpers.wrappers import full_state, wrap

BACKENDS = ("ddp", "fsdp1", "fsdp2")
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
NAIVE_AT_LEAST = 1e-3

FULL = (0, 1, 2)
ZERO = len(lm.LENGTHS)  # an extra step whose micro-batches are all padding on every rank
LENGTHS = [*lm.LENGTHS, [[[0, 0]] * lm.ACCUM_STEPS] * lm.WORLD_SIZE]
EVERYTHING = [list(range(lm.ACCUM_STEPS))] * lm.WORLD_SIZE

# A window: (data step, micro-batch indices per rank, how it ends: "full", "flush" or "last").
Window = tuple[int, list[list[int]], str]


def full_windows(*steps: int) -> list[Window]:
    return [(step, EVERYTHING, "full") for step in steps]


# The short last window: flush() lets ranks hold different numbers of micro-steps (DDP, plain); FSDP can only
# reduce inside a backward, so every rank marks its last micro-step with micro_step(last=True).
SHORT_WINDOWS: dict[str, list[Window]] = {
    "flush": [*full_windows(0, 1), (2, [[0, 1], [2]], "flush")],
    "last": [*full_windows(0, 1), (2, [[0, 1], [1, 2]], "last")],
}
# Window 0 and window 2 hold no item on any rank: skipped steps that must leave no trace.
ZERO_WINDOWS: list[Window] = full_windows(ZERO, 0, ZERO, 1, 2)


def reference_batches(windows: list[Window]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole batch of every window that has items, in order."""
    return [
        lm.global_batch(step, [(rank, i) for rank, indices in enumerate(per_rank) for i in indices], LENGTHS)
        for step, per_rank, _ in windows
        if step != ZERO
    ]


@contextlib.contextmanager
def count_all_reduces() -> Iterator[list[int]]:
    """Counts the engine's scalar all-reduces: Python-level and synchronous (DDP's bucket reductions run in C++, or
    asynchronously in distaccum's comm hook)."""
    counter = [0]
    original = torch_dist.all_reduce

    def counting(*args, **kwargs):
        counter[0] += not kwargs.get("async_op", False)
        return original(*args, **kwargs)

    torch_dist.all_reduce = counting
    try:
        yield counter
    finally:
        torch_dist.all_reduce = original


def train(
    model: torch.nn.Module,
    windows: list[Window],
    ranks: list[int],
    *,
    exact: bool,
    optimizer: str = "adam",
) -> list[dict]:
    """Train on ``windows``, this process taking the micro-batches of ``ranks``; return each step's result."""
    plan = BatchPlan(global_batch_size=lm.GLOBAL_BATCH, micro_batch_size=lm.MICRO_BATCH)
    acc = Accumulator(model, lm.make_optimizer(model.parameters(), optimizer), plan)
    steps = []
    for step, per_rank, end in windows:
        mine = [(rank, index) for rank in ranks for index in per_rank[rank]]
        with count_all_reduces() as all_reduces:
            for position, (rank, index) in enumerate(mine):
                inputs, targets = lm.micro_batch(step, rank, index, LENGTHS)
                with acc.micro_step(last=end == "last" and position == len(mine) - 1):
                    loss = lm.token_loss(model(inputs), targets)
                    if exact:
                        acc.backward(loss, num_items=lm.count_items(targets))
                    else:
                        # The naive recipe: every micro-batch's token mean weighs 1/accum_steps (an all-padding
                        # one counts as 0, not NaN, to be fair to it).
                        acc.backward(torch.nan_to_num(loss))
            if end == "flush":
                acc.flush()
        assert acc.stepped and acc.micro_step_in_window == 0
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        steps.append({**dataclasses.asdict(acc.last_step), "params_finite": finite, "all_reduces": all_reduces[0]})
    return steps


def run_cases(model_for, state_of, ranks: list[int], short: str) -> dict:
    """Every case on one backend; ``model_for(dtype)`` builds (and wraps) a fresh model."""
    cases: dict[str, tuple[torch.dtype, list[Window], bool]] = {
        "exact": (torch.float32, full_windows(*FULL), True),
        "exact_float64": (torch.float64, full_windows(*FULL), True),
        "naive": (torch.float32, full_windows(*FULL), False),
        "short": (torch.float32, SHORT_WINDOWS[short], True),
        "zero": (torch.float32, ZERO_WINDOWS, True),
    }
    results = {}
    for name, (dtype, windows, exact) in cases.items():
        model = model_for(dtype)
        steps = train(model, windows, ranks, exact=exact)
        results[name] = {"state": state_of(model), "steps": steps, "windows": windows, "dtype": dtype}
        del model
    return results


def train_backend(rank: int, world_size: int, backend: str) -> dict:
    return run_cases(
        lambda dtype: wrap(lm.make_lm(dtype), backend, world_size),
        full_state,
        [rank],
        "last" if backend.startswith("fsdp") else "flush",
    )


def train_plain() -> dict:
    def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in model.state_dict().items()}

    return run_cases(lm.make_lm, state, list(range(lm.WORLD_SIZE)), "flush")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    # Tiny tensors: with 2 intra-op threads on 2 busy shared cores these runs were 10x slower (16 s vs 0.5 s).
    # The spawned ranks run with 1 thread too (tests/helpers/spawn.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=("plain", *BACKENDS))
def backend_run(request) -> tuple[str, list[dict]]:
    if request.param == "plain":
        with one_thread():
            return "plain", [train_plain()]
    return request.param, run_ranks(train_backend, request.param)


_references: dict = {}


def reference(case: dict) -> tuple[dict[str, torch.Tensor], list[float], list[int]]:
    key = (repr(case["windows"]), case["dtype"])
    if key not in _references:
        with one_thread():
            _references[key] = lm.reference_run(reference_batches(case["windows"]), case["dtype"])
    return _references[key]


def check_matches_reference(backend: str, ranks: list[dict], name: str) -> None:
    for rank, results in enumerate(ranks):
        case = results[name]
        expected, losses, counts = reference(case)
        error = max_relative_error(case["state"], expected)
        print(f"{backend} {name} rank {rank}: max relative weight error {error:.2e}")
        assert error <= TOLERANCE[case["dtype"]]
        with_items = [s for s in case["steps"] if not s["skipped"]]
        assert [s["num_items"] for s in with_items] == counts
        assert [s["loss"] for s in with_items] == pytest.approx(losses, rel=TOLERANCE[case["dtype"]])
        assert all(s["params_finite"] for s in case["steps"])


@pytest.mark.parametrize("name", ["exact", "exact_float64"])
def test_token_weighted_windows_match_the_real_batch(backend_run, name):
    backend, ranks = backend_run
    check_matches_reference(backend, ranks, name)
    for results in ranks:
        assert [s["skipped"] for s in results[name]["steps"]] == [False] * len(FULL)


def test_naive_mean_of_micro_batch_means_is_far_off(backend_run):
    backend, ranks = backend_run
    for rank, results in enumerate(ranks):
        case = results["naive"]
        expected, losses, _ = reference(case)
        error = max_relative_error(case["state"], expected)
        exact_error = max_relative_error(results["exact"]["state"], expected)
        loss_error = max(abs(s["loss"] - e) / e for s, e in zip(case["steps"], losses, strict=True))
        print(
            f"{backend} rank {rank}: naive 1/accum_steps weighting: max relative weight error {error:.2e} "
            f"(num_items: {exact_error:.2e}), logged loss off by up to {loss_error:.1%}"
        )
        assert error > NAIVE_AT_LEAST
        assert case["steps"][0]["num_items"] is None


def test_short_last_window_is_weighted_by_the_items_it_saw(backend_run):
    backend, ranks = backend_run
    check_matches_reference(backend, ranks, "short")
    for results in ranks:
        short = results["short"]["steps"][-1]
        expected_micro_steps = sum(map(len, results["short"]["windows"][-1][1]))
        assert short["micro_steps"] == expected_micro_steps < lm.ACCUM_STEPS * lm.WORLD_SIZE


def test_windows_without_items_are_skipped_and_leave_no_trace(backend_run):
    backend, ranks = backend_run
    check_matches_reference(backend, ranks, "zero")
    for results in ranks:
        steps = results["zero"]["steps"]
        assert [s["skipped"] for s in steps] == [True, False, True, False, False]
        for empty in (steps[0], steps[2]):
            assert empty["num_items"] == 0 and math.isnan(empty["loss"]) and empty["grad_norm"] is None
        assert steps[-1]["step"] == len(ZERO_WINDOWS)


def test_one_scalar_all_reduce_per_window(backend_run):
    # Python-level all-reduces per window. DDP and FSDP reduce gradients by other calls, so under DDP every
    # counted one is the engine's: one per window, plus the MAX that sets the first items-per-micro-step
    # estimate (repeated at each micro-step while no rank has an item yet: the run opening with an empty
    # window). No backend adds one without clipping: FSDP1's sharded grad-norm all-reduce is not needed for the
    # non-finite check, which each rank makes on its shard and sends in the window's all-reduce. One process: none.
    backend, ranks = backend_run
    extra_per_step = {"plain": 0, "ddp": 0, "fsdp1": 0, "fsdp2": 0}[backend]
    engine = {"exact": [2, 1, 1], "zero": [1 + lm.ACCUM_STEPS, 2, 1, 1, 1]}
    for results in ranks:
        for case, counts in engine.items():
            steps = results[case]["steps"]
            seen = [s["all_reduces"] for s in steps]
            if backend == "plain":
                expected = [0] * len(counts)
            else:
                expected = [c + (0 if s["skipped"] else extra_per_step) for c, s in zip(counts, steps, strict=True)]
            print(f"{backend} {case}: all-reduces per window {seen}")
            assert seen == expected, (case, seen)


def test_the_data_is_as_unbalanced_as_the_tests_claim():
    # Guards what the tests above rely on. Tokens per micro-batch, [step][rank][micro-batch].
    counts = [[[sum(sequence) for sequence in rank] for rank in step] for step in lm.LENGTHS]
    assert sum(counts[0][0]) >= 7 * sum(counts[0][1])  # ranks: 66 vs 9 tokens
    assert min(map(min, counts[0] + counts[1] + counts[2])) == 0 and max(map(max, counts[0])) == 24
    assert counts[1][1][0] == 0 < counts[1][0][0]  # all padding on rank 1 only, at a window's first micro-step
    assert counts[2][1][-1] == 0 < counts[2][0][-1]  # ... and at a boundary, where the reduction happens


# ------------------------------------------------------------------------------------------- fp16 safety
# Target tokens per micro-batch, 2 windows x 3. The run opens with an all-padding micro-batch, so that the
# engine's first items-per-micro-step estimate must wait for the second one.
FP16_ITEMS = [[0, 3000, 1500], [2500, 1000, 3000]]


def fp16_micro_batch(window: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = FP16_ITEMS[window][index]
    lengths = [lm.SEQ_LEN] * (items // lm.SEQ_LEN) + ([items % lm.SEQ_LEN] if items % lm.SEQ_LEN else [])
    lengths = lengths or [0] * 64
    return lm.sequences(lengths, seed=100 * window + index)


@one_thread()
def test_fp16_grad_scaler_sees_a_loss_of_the_size_of_loss_over_accum_steps():
    model = lm.make_lm()
    scaler = torch.amp.GradScaler("cpu")
    initial_scale = scaler.get_scale()
    plan = BatchPlan(micro_batch_size=1, accum_steps=3, world_size=1)
    acc = Accumulator(model, lm.make_optimizer(model.parameters()), plan, grad_scaler=scaler)
    multipliers = []  # d(what backward ran on) / d(loss), over the GradScaler's scale: the engine's own factor
    for window in range(len(FP16_ITEMS)):
        for index in range(plan.accum_steps):
            inputs, targets = fp16_micro_batch(window, index)
            with acc.micro_step():
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = lm.token_loss(model(inputs), targets)
                loss.register_hook(lambda grad: multipliers.append(float(grad) / scaler.get_scale()))
                acc.backward(loss, num_items=lm.count_items(targets))
        assert acc.last_step.num_items == sum(FP16_ITEMS[window])
    relative = [m * plan.accum_steps for m in multipliers]
    print(f"per-micro-step loss multiplier x accum_steps: {[round(r, 3) for r in relative]}")
    # n / c with c the (first, then previous) window's items per micro-step: bounded by the spread of the data,
    # never by the token count itself (1000-3000 here); an all-padding micro-batch weighs nothing.
    assert len(relative) == 6 and relative[0] == 0.0
    assert all(0.25 <= r <= 4 for r in relative[1:])
    assert acc.skipped_steps == 0 and scaler.get_scale() == initial_scale


@one_thread()
def test_fp16_scaling_by_raw_token_counts_would_overflow():
    # What the engine avoids: weighting by n directly (loss * n / accum_steps, exact only up to a constant)
    # overflows fp16 at the GradScaler's default scale with a few thousand tokens per micro-batch.
    model = lm.make_lm()
    optimizer = lm.make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    initial_scale = scaler.get_scale()
    for index in range(3):
        inputs, targets = fp16_micro_batch(0, index)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lm.token_loss(model(inputs), targets)
        scaler.scale(loss * lm.count_items(targets) / 3).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < initial_scale  # inf found: the step was skipped
