"""Compiled autograd under accumulation: the rank workers of ``tests/distributed/test_compiled_autograd.py``.

Compiled autograd is turned on as users do on torch 2.13: a ``torch._dynamo.compiled_autograd._enable(compiler)``
context around the training loop (the tutorial's ``torch.compile(backend="aot_eager")``, or torchtitan's
``torch._dynamo.utils.maybe_enable_compiled_autograd(True)``, which uses inductor), or
``torch._dynamo.config.compiled_autograd = True`` before ``torch.compile``. Under DDP it needs
``torch._dynamo.config.optimize_ddp = "python_reducer"``, set before ``DistributedDataParallel`` is built.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, rank_micro_batches

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
