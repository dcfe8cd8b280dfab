"""Rank functions for the non-finite checks that cost no pass of their own (tests/distributed/test_nonfinite.py).

Rank 1's gradient turns NaN in window 2 while every loss stays finite: ``0 * sqrt(out - out)`` is 0 forward and
NaN backward (``0 / 0`` in sqrt's derivative), and the NaN flows through the model's own backward (and the
wrapper's reduction) into every gradient. Only a check of the gradient itself can catch it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer
from tests.helpers.wrappers import full_state, wrap

MICRO = 4
WINDOWS = 3
POISONED = 2  # the window (1-based) whose gradient rank 1 poisons


def poisoned_gradient(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` plus a term that is 0 forward and NaN backward."""
    return loss + 0.0 * (output - output.detach()).abs().sum().sqrt()


def nan_gradient_with_finite_loss(rank: int, world_size: int, backend: str, user_hook: bool) -> dict[str, Any]:
    """Train 3 windows of 2 micro-steps; rank 1 poisons window 2. Returns the step results, the weights after
    each step, and how distaccum's DDP comm hook was used."""
    model = wrap(make_model(), backend, world_size)
    if user_hook:  # the user's own hook (registered before the first step) must be kept, and NaN still caught
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model.register_comm_hook(None, allreduce_hook)
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    )
    steps, weights = _train(acc, model, rank, world_size, lambda: full_state(model))
    hook = getattr(model, "_distaccum_checked_average", None)
    return {
        "steps": steps,
        "weights": weights,
        "hook_reductions": None if hook is None else hook.reductions,
        "comm_hooks": len(getattr(model, "_comm_hooks", [])),
    }


def zero0_unclipped(rank: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed ZeRO 0 without clipping, so no norm is computed: the window factor (``num_items``, ragged) and the
    NaN/inf check share one pass over ``param.grad``. Rank 1 poisons window 2; window 3 weights by items."""
    import os

    import deepspeed  # noqa: F401  (before the Accumulator picks its backend, as a user would)

    from distaccum.integrations.deepspeed import initialize

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    config = {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    model = make_model()
    engine = initialize(model, make_optimizer("sgd", model.parameters()), plan, config)
    acc = Accumulator(engine, engine.optimizer, plan)
    state = engine.module.state_dict
    steps, weights = _train(
        acc, engine, rank, world_size, lambda: {name: value.detach().clone() for name, value in state().items()},
        items=ZERO0_ITEMS,
    )  # fmt: skip
    return {"steps": steps, "weights": weights}


def _train(
    acc: Accumulator,
    forward: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    world_size: int,
    weights_of: Callable[[], dict[str, Any]],
    items: dict[int, int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """WINDOWS windows of 2 micro-steps; rank 1 poisons the first micro-step of window POISONED; with ``items``,
    the last window counts the first ``items[index]`` samples of each micro-batch (``num_items``). Returns each
    step's result and the weights after it."""
    inputs, targets = make_data(2 * WINDOWS * world_size, MICRO)
    steps, weights = [], []
    for window in range(WINDOWS):
        for micro in range(2):
            index = (window * 2 + micro) * world_size + rank
            with acc.micro_step():
                output = forward(inputs[index])
                if items is not None and window + 1 == WINDOWS:
                    count = items[index]
                    acc.backward(loss_fn(output[:count], targets[index][:count]), num_items=count * output.shape[1])
                    continue
                loss = loss_fn(output, targets[index])
                if rank == 1 and window + 1 == POISONED and micro == 0:
                    loss = poisoned_gradient(output, loss)
                acc.backward(loss)
        result = acc.last_step
        steps.append({"skipped": result.skipped, "loss": result.loss, "grad_norm": result.grad_norm})
        weights.append(weights_of())
    return steps, weights


ZERO0_ITEMS = {8: 4, 9: 1, 10: 3, 11: 2}  # window 3's micro-batches (index: samples that count), ragged
