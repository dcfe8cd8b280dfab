"""Compiled autograd under accumulation, against one process on the real batch without distaccum (fp32).

One process: a compiled model in a compiled-autograd context. Two gloo ranks: DDP with
``optimize_ddp="python_reducer"``, which compiled autograd needs (DDP then all-reduces each gradient from a
post-accumulate-grad hook that reads ``no_sync``'s flag, instead of its C++ reducer). Counts: compiled-autograd
captures and dynamo graphs per micro-step, gradient all-reduces per micro-step (profiler).
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.common import max_relative_error, reference_run
from tests.helpers.compiled_autograd_workers import (
    ACCUM_STEPS,
    CPP_REDUCER_MODES,
    PARAMS,
    STEPS,
    cpp_reducer_failures,
    global_batch,
    train,
)
from tests.helpers.spawn import run_ranks

TOLERANCE = 1e-6  # fp32, as the other compiled-model tests


def after_first_window(result: dict, key: str, world_size: int) -> set:
    """The values of ``key`` from the first window's boundary on (one value: nothing was added after warm-up)."""
    return {record[key] for record in result["micro_steps"][ACCUM_STEPS[world_size] - 1 :]}


def test_compiled_autograd_on_one_process_equals_the_real_batch_without_recompiling():
    (result,) = run_ranks(train, "compiled", "aot_eager", world_size=1, timeout_s=120)
    expected, _ = reference_run("sgd", STEPS, global_batch(1))
    assert result["optimizer_steps"] == STEPS
    assert max_relative_error(result["state"], expected) <= TOLERANCE
    # Backward graphs are captured in the first window (before and after .grad exists), none at later boundaries.
    assert result["micro_steps"][0]["captures"] >= 1
    assert len(after_first_window(result, "captures", 1)) == 1, result["micro_steps"]
    assert len(after_first_window(result, "graphs", 1)) == 1, result["micro_steps"]


def test_compiled_autograd_config_flag_does_not_reach_acc_backward_of_a_compiled_model():
    # torch._dynamo.config.compiled_autograd=True enables it only while a compiled function runs: the model's
    # forward, not acc.backward(loss) after it. Eager backward, exact, and no capture at all.
    (result,) = run_ranks(train, "compiled", "config-flag", world_size=1, timeout_s=120)
    expected, _ = reference_run("sgd", STEPS, global_batch(1))
    assert max_relative_error(result["state"], expected) <= TOLERANCE
    assert {record["captures"] for record in result["micro_steps"]} == {0}


@pytest.mark.parametrize(
    ("wrap", "autograd"),
    [
        ("ddp", "aot_eager"),
        ("compiled-ddp", "aot_eager"),
        ("ddp-of-compiled", "aot_eager"),
        ("ddp", None),  # the Python reducer without compiled autograd: distaccum's bucket comm hook broke it too
        pytest.param("compiled-ddp", "inductor", marks=pytest.mark.slow),  # torchtitan's compiled-autograd helper
    ],
)
def test_ddp_python_reducer_reduces_only_at_the_boundary_and_equals_the_real_batch(wrap: str, autograd: str | None):
    # distaccum attached its GradBucket comm hook at the first boundary; the Python reducer calls comm hooks per
    # parameter with (grad, param): "Dynamo does not know how to trace method `buffer` of class `tuple`" under
    # compiled autograd, AttributeError without it. The backend no longer attaches it there.
    results = run_ranks(train, wrap, autograd, timeout_s=240)
    expected, _ = reference_run("sgd", STEPS, global_batch(2))
    for result in results:
        assert result["optimizer_steps"] == STEPS
        assert max_relative_error(result["state"], expected) <= TOLERANCE
        inside = [record for record in result["micro_steps"] if not record["boundary"]]
        assert all(record["reductions"] == 0 and record["grads_differ"] for record in inside), inside
        # The first boundary's count includes the calls made while compiling; later ones are run time only.
        later = [record["reductions"] for record in result["micro_steps"] if record["boundary"] and record["step"]]
        if autograd == "inductor":  # inductor fuses the per-parameter all-reduces into buckets
            assert all(1 <= count <= PARAMS for count in later), later
        else:
            assert later == [PARAMS] * (STEPS - 1), later
        assert len(after_first_window(result, "graphs", 2)) == 1, result["micro_steps"]
        if autograd is None:
            assert {record["captures"] for record in result["micro_steps"]} == {0}
        else:
            assert result["micro_steps"][0]["captures"] >= 1
            assert len(after_first_window(result, "captures", 2)) == 1, result["micro_steps"]


def test_compiled_autograd_with_ddps_cpp_reducer_fails_at_the_first_micro_step_with_the_fix():
    # torch refuses before any gradient is computed, and its message names the setting. It must be set before
    # DistributedDataParallel is built; torchtitan's "python_reducer_without_compiled_forward" leaves a DDP module
    # on the C++ reducer on torch 2.13 (DDP compares the mode with "python_reducer" only).
    results = run_ranks(cpp_reducer_failures, timeout_s=120)
    for failures in results:
        assert list(failures) == list(CPP_REDUCER_MODES)
        for mode, failure in failures.items():
            assert failure["error"] is not None, mode
            assert re.search(
                r"Compiled autograd is not compatible with C\+\+ DDP Reducer, please use "
                r'torch\._dynamo\.config\.optimize_ddp="python_reducer"',
                failure["error"],
            ), failure["error"]
            assert failure["completed_micro_steps"] == 0 and failure["optimizer_steps"] == 0, failure
