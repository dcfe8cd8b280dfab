"""Compiled autograd under accumulation, against one process on the real batch without distaccum (fp32).

One process: a compiled model in a compiled-autograd context. Two gloo ranks: DDP with
``optimize_ddp="python_reducer"``, which compiled autograd needs (DDP then all-reduces each gradient from a
post-accumulate-grad hook that reads ``no_sync``'s flag, instead of its C++ reducer). Counts: compiled-autograd
captures and dynamo graphs per micro-step, gradient all-reduces per micro-step (profiler).

Compiled autograd is turned on as users do on torch 2.13: a ``torch._dynamo.compiled_autograd._enable(compiler)``
context around the training loop (the tutorial's ``torch.compile(backend="aot_eager")``, or torchtitan's
``torch._dynamo.utils.maybe_enable_compiled_autograd(True)``, which uses inductor), or
``torch._dynamo.config.compiled_autograd = True`` before ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import (
    loss_fn,
    make_data,
    make_model,
    make_optimizer,
    max_relative_error,
    rank_micro_batches,
    reference_run,
)
from tests.helpers.spawn import run_ranks

TOLERANCE = 1e-6  # fp32, as the other compiled-model tests

# Per-rank bodies (run in spawned processes under tests.helpers.spawn.run_ranks)

STEPS = 3
MICRO_BATCH = 4
ACCUM_STEPS = {1: 4, 2: 3}  # per world size
PARAMS = len(list(make_model().parameters()))  # parameter tensors: the Python reducer all-reduces each one
# DDP's Python reducer reduces through functional collectives (and inductor fuses them into the in-place variant);
# distaccum's own scalar all-reduce is c10d::allreduce_, so it is not counted.
REDUCTION_OP = "_c10d_functional::all_reduce"


def global_batch(world_size: int) -> int:
    return ACCUM_STEPS[world_size] * MICRO_BATCH * world_size


def compiled_autograd(autograd: str | None) -> contextlib.AbstractContextManager[Any]:
    """The context users run their loop in: compiled autograd with this compiler (None, "config-flag": none)."""
    if autograd == "aot_eager":
        return torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager"))
    if autograd == "inductor":
        return torch._dynamo.utils.maybe_enable_compiled_autograd(True)
    return contextlib.nullcontext()


def build(module: nn.Module, wrap: str, backend: str) -> nn.Module:
    if wrap == "compiled":
        return torch.compile(module, backend=backend)
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(module)
    if wrap == "compiled-ddp":  # what Accelerate's dynamo_backend builds, and what "python_reducer" is made for
        return torch.compile(nn.parallel.DistributedDataParallel(module), backend=backend)
    if wrap == "ddp-of-compiled":
        return nn.parallel.DistributedDataParallel(torch.compile(module, backend=backend))
    raise ValueError(wrap)


def grads_differ_across_ranks(module: nn.Module) -> bool:
    flat = torch.cat([p.grad.detach().flatten() for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(gathered, flat)
    return not all(torch.equal(gathered[0], other) for other in gathered[1:])


def reductions(profile: torch.profiler.profile) -> int:
    return sum(event.count for event in profile.key_averages() if event.key.startswith(REDUCTION_OP))


def train(rank: int, world_size: int, wrap: str, autograd: str | None) -> dict:
    """3 windows under compiled autograd; per micro-step: boundary or not, gradient all-reduces run, whether the
    ranks' gradients still differ after it (inside the window), compiled-autograd captures and dynamo graphs so far."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    if world_size > 1:
        torch._dynamo.config.optimize_ddp = "python_reducer"  # read by DistributedDataParallel.__init__
    if autograd == "config-flag":
        torch._dynamo.config.compiled_autograd = True  # read by torch.compile
    module = make_model()
    model = build(module, wrap, "inductor" if autograd == "inductor" else "aot_eager")
    accum_steps = ACCUM_STEPS[world_size]
    acc = Accumulator(
        model,
        make_optimizer("sgd", model.parameters()),
        BatchPlan(global_batch_size=global_batch(world_size), micro_batch_size=MICRO_BATCH),
    )
    inputs, targets = make_data(STEPS, global_batch(world_size))
    micro_steps = []
    with compiled_autograd(autograd):
        for step in range(STEPS):
            for x, y in rank_micro_batches(inputs[step], targets[step], rank, world_size, MICRO_BATCH):
                boundary = acc.micro_step_in_window + 1 == accum_steps
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    with acc.micro_step():
                        acc.backward(loss_fn(model(x), y))
                        differ = None if boundary or world_size == 1 else grads_differ_across_ranks(module)
                micro_steps.append(
                    {
                        "step": step,
                        "boundary": boundary,
                        "reductions": reductions(profile),
                        "grads_differ": differ,
                        "captures": counters["compiled_autograd"]["captures"],
                        "graphs": counters["stats"]["unique_graphs"],
                    }
                )
    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    return {"micro_steps": micro_steps, "state": state, "optimizer_steps": acc.optimizer_steps}


CPP_REDUCER_MODES = (True, "python_reducer_without_compiled_forward")
"""optimize_ddp values that leave DistributedDataParallel on its C++ reducer: torch's default, and torchtitan's
setting for an uncompiled DDP module (on torch 2.13 only "python_reducer" switches DDP to the Python reducer)."""


def cpp_reducer_failures(rank: int, world_size: int) -> dict:
    """Per optimize_ddp mode: what the first micro-step under compiled autograd raises, and how far the run got."""
    failures: dict = {}
    for mode in CPP_REDUCER_MODES:
        torch._dynamo.reset()
        torch._dynamo.config.optimize_ddp = mode
        model = nn.parallel.DistributedDataParallel(make_model())
        acc = Accumulator(
            model,
            make_optimizer("sgd", model.parameters()),
            BatchPlan(global_batch_size=global_batch(world_size), micro_batch_size=MICRO_BATCH),
        )
        inputs, targets = make_data(1, global_batch(world_size))
        error, completed = None, 0
        with compiled_autograd("aot_eager"):
            try:
                for x, y in rank_micro_batches(inputs[0], targets[0], rank, world_size, MICRO_BATCH):
                    with acc.micro_step():
                        acc.backward(loss_fn(model(x), y))
                    completed += 1
            except RuntimeError as raised:
                error = str(raised)
        failures[mode] = {"error": error, "completed_micro_steps": completed, "optimizer_steps": acc.optimizer_steps}
        del model, acc
    return failures


# Tests


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
