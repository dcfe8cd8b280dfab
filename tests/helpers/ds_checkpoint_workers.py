"""DeepSpeed engines through ``distaccum.checkpoint`` on 2 gloo ranks: a run saved at a window boundary, stopped and
resumed into fresh engines ends with the weights of the uninterrupted run, at ZeRO 0, 2 and 3."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distaccum import Accumulator, BatchPlan, checkpoint
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer

MICRO_BATCH, ACCUM, WORLD = 4, 3, 2
GLOBAL_BATCH = MICRO_BATCH * ACCUM * WORLD
STEPS, SAVED_AT = 5, 2
STAGES = (0, 2, 3)


def config(stage: int) -> dict:
    # Threshold 0 at stage 3: every parameter is partitioned (the test model's are all small enough to stay whole).
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    return {"zero_optimization": zero, "gradient_clipping": 0.0, "steps_per_print": 10**9}


def build(stage: int) -> tuple[object, Accumulator]:
    import deepspeed  # noqa: F401  (before the Accumulator picks its backend, as a user would)

    from distaccum.integrations.deepspeed import initialize

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = make_model()
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    engine = initialize(model, make_optimizer("adam", model.parameters()), plan, config(stage))
    return engine, Accumulator(engine, engine.optimizer, plan)


def train(engine, acc: Accumulator, rank: int, steps: range, *, stop_after: int | None = None) -> None:
    inputs, targets = make_data(STEPS, GLOBAL_BATCH)
    per_rank = GLOBAL_BATCH // WORLD
    for step in steps:
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        micro_batches = zip(inputs[step][mine].split(MICRO_BATCH), targets[step][mine].split(MICRO_BATCH), strict=True)
        for index, (x, y) in enumerate(micro_batches):
            with acc.micro_step():
                acc.backward(loss_fn(engine(x), y))
            if stop_after is not None and index + 1 == stop_after:
                return


def full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {name: value.detach().clone() for name, value in engine.module.state_dict().items()}


def resume_worker(rank: int, world_size: int, directory: str) -> dict:
    """Per stage: the uninterrupted run, and the run saved after SAVED_AT steps and resumed into fresh engines."""
    results = {}
    for stage in STAGES:
        where = Path(directory) / f"zero{stage}"
        engine, acc = build(stage)
        train(engine, acc, rank, range(STEPS))
        uninterrupted = full_weights(engine)
        del acc, engine
        engine, acc = build(stage)
        train(engine, acc, rank, range(SAVED_AT))
        checkpoint.save(where, model=engine, optimizer=engine.optimizer, accumulator=acc, data_state={"step": SAVED_AT})
        train(engine, acc, rank, range(SAVED_AT, STEPS))  # the run goes on after the save: nothing leaks back
        del acc, engine
        engine, acc = build(stage)  # a restarted job: fresh engines, as ZeRO 3's load_checkpoint requires
        data = checkpoint.load(where, model=engine, optimizer=engine.optimizer, accumulator=acc)
        assert data is not None
        train(engine, acc, rank, range(data["step"], STEPS))
        results[stage] = {
            "data": data,
            "steps": acc.optimizer_steps,
            "resumed": full_weights(engine),
            "uninterrupted": uninterrupted,
            "files": sorted(str(path.relative_to(where)) for path in where.rglob("*") if path.is_file()),
        }
        refusals = {}
        train(engine, acc, rank, range(1), stop_after=1)  # one micro-step into a window
        try:
            checkpoint.save(where, model=engine, optimizer=engine.optimizer, accumulator=acc)
        except ValueError as error:
            refusals["mid_window"] = str(error)
        results[stage]["refusals"] = refusals
        del acc, engine
    return results


def other_world_size_worker(rank: int, world_size: int, directory: str) -> str:
    """Load a 2-rank engine checkpoint on ``world_size`` ranks: the refusal's message."""
    import deepspeed  # noqa: F401

    from distaccum.integrations.deepspeed import initialize

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = make_model()
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    engine = initialize(model, make_optimizer("adam", model.parameters()), plan, config(2))
    acc = Accumulator(engine, engine.optimizer, plan)
    try:
        checkpoint.load(Path(directory) / "zero2", model=engine, optimizer=engine.optimizer, accumulator=acc)
    except ValueError as error:
        return str(error)
    return "loaded"
