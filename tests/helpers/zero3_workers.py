"""DeepSpeed ZeRO 3 on 2 gloo ranks: uneven per-rank data through ``acc.iterate()``, and the mid-window checkpoint
refusal. ZeRO 3 all-gathers the parameters in every forward, so a rank that ran fewer forwards than the others
would leave them waiting: these workers run under ``tests.helpers.spawn.run_ranks``' timeout."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer

MICRO_BATCH = 4
WORLD = 2
ACCUM = 3
GLOBAL_BATCH = ACCUM * MICRO_BATCH * WORLD  # 24
# Micro-batches each rank's loader holds: rank 1 runs out two micro-batches into the second window.
RANK_MICRO_BATCHES = (8, 5)
COMMON_MICRO_BATCHES = (ACCUM, min(RANK_MICRO_BATCHES) - ACCUM)  # what every rank trains on, per window: (3, 2)
# Read but not trained on: rank 0's third micro-batch of the cut window (its last two are never read).
DROPPED = (1, 0)
SAMPLES_PER_RANK = max(RANK_MICRO_BATCHES) * MICRO_BATCH


def zero3_config(clipping: float = 0.0) -> dict:
    # Threshold 0: every parameter is partitioned (the default keeps parameters under 1e5 elements whole on every
    # rank, which is all of the test model's).
    return {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    }


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's whole weights (ZeRO 3 keeps a shard per rank: gathered for the read; a no-op below stage 3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {name: value.detach().clone() for name, value in engine.module.state_dict().items()}


def rank_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Both ranks' samples, rank-major: rank r owns rows r * SAMPLES_PER_RANK onwards."""
    inputs, targets = make_data(1, WORLD * SAMPLES_PER_RANK, seed=7)
    return inputs[0], targets[0]


def _setup() -> tuple[object, Accumulator, BatchPlan]:
    import deepspeed  # noqa: F401  (before the Accumulator picks its backend, as a user would)

    from distaccum.integrations.deepspeed import initialize

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = make_model()
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    engine = initialize(model, make_optimizer("sgd", model.parameters()), plan, zero3_config())
    return engine, Accumulator(engine, engine.optimizer, plan), plan


def uneven_worker(rank: int, world_size: int) -> dict:
    """Train on this rank's loader (8 or 5 micro-batches) through acc.iterate(); count the forwards."""
    engine, acc, _ = _setup()
    forwards = [0]
    engine.module.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    inputs, targets = rank_data()
    mine = slice(rank * SAMPLES_PER_RANK, rank * SAMPLES_PER_RANK + RANK_MICRO_BATCHES[rank] * MICRO_BATCH)
    loader = list(zip(inputs[mine].split(MICRO_BATCH), targets[mine].split(MICRO_BATCH), strict=True))
    steps = []
    for x, y in acc.iterate(loader):
        with acc.micro_step():
            acc.backward(loss_fn(engine(x), y))
        if acc.stepped:
            steps.append({"micro_steps": acc.last_step.micro_steps, "weights": full_weights(engine)})
    result = {"steps": steps, "forwards": forwards[0], "dropped": acc.dropped_micro_batches, "flushed": acc.flush()}
    del acc, engine
    return result


def mid_window_checkpoint_worker(rank: int, world_size: int, directory: str) -> dict:
    """One micro-step into a window, try both ways of checkpointing it; then finish the window on every rank."""
    from distaccum import checkpoint

    engine, acc, _ = _setup()
    inputs, targets = rank_data()
    batches = list(zip(inputs.split(MICRO_BATCH), targets.split(MICRO_BATCH), strict=False))[:ACCUM]
    refusals = {}
    for index, (x, y) in enumerate(batches):
        with acc.micro_step():
            acc.backward(loss_fn(engine(x), y))
        if index == 0:
            refusals["save"] = _refusal(
                checkpoint.save, directory, model=engine, optimizer=acc.optimizer, accumulator=acc, include_grads=True
            )
            refusals["state_dict"] = _refusal(acc.state_dict, include_grads=True)
    result = {
        "refusals": refusals,
        "written": sorted(p.name for p in Path(directory).glob("*")),
        "steps": acc.optimizer_steps,
    }
    del acc, engine
    return result


def _refusal(call, *args, **kwargs) -> str | None:
    try:
        call(*args, **kwargs)
    except ValueError as error:
        return str(error)
    return None


def reference_uneven() -> list[dict[str, torch.Tensor]]:
    """One process, the real batches: each window's samples of both ranks (only what every rank had)."""
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    inputs, targets = rank_data()
    weights, start = [], 0
    for micro_steps in COMMON_MICRO_BATCHES:
        rows = torch.cat(
            [
                torch.arange(
                    rank * SAMPLES_PER_RANK + start * MICRO_BATCH,
                    rank * SAMPLES_PER_RANK + (start + micro_steps) * MICRO_BATCH,
                )
                for rank in range(WORLD)
            ]
        )
        optimizer.zero_grad()
        loss_fn(model(inputs[rows]), targets[rows]).backward()
        optimizer.step()
        weights.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        start += micro_steps
    return weights
