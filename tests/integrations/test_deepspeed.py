"""DeepSpeed ZeRO 0 to 3 under the Accumulator: equal to the real batch, one loss scaling, exact item weighting.

The 2-rank run (one spawn, ZeRO 0, 1, 2, 3 and 3 with its optimizer offloaded to the CPU in turn) trains nine
windows per engine on a real DeepSpeed engine
over a gloo group: three full windows, a short window ended by ``acc.flush()``, three windows with ragged
``num_items`` (one micro-batch of one rank without any item), a window without any item (skipped) and a short
``last=True`` window with items; gradient clipping binds on some steps. Each step's weights and pre-clip
gradient norm are compared with one process training on exactly the samples of that window. ZeRO 3 (every
parameter partitioned) also runs uneven per-rank data through ``acc.iterate()`` under a timeout, and refuses a
mid-window checkpoint with the way out. ZeRO 3 all-gathers the parameters in every forward, so a rank that ran
fewer forwards than the others would leave them waiting: its per-rank bodies run under ``run_ranks``' timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import count_calls, loss_fn, make_data, make_model, make_optimizer, max_relative_error
from tests.helpers.launchers import free_port
from tests.helpers.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "launch" / "deepspeed"
# The engines the 2-rank run trains in turn, by ZeRO stage; "-offload": optimizer offloaded to the CPU.
SETUPS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3-offload": 3}
CONFIG_STAGES = (0, 1, 2, 3)  # launch/deepspeed/zero{stage}.json
GLOBAL_BATCH = 48
MICRO_BATCH = 4
WORLD = 2
ACCUM = GLOBAL_BATCH // (MICRO_BATCH * WORLD)  # 6
TAIL = 2  # micro-steps per rank in each short window
CLIP = 0.45  # binds on some steps of this run and not on others (asserted)
# (kind, micro-steps per rank): the window sequence every engine trains.
WINDOWS = (
    ("mean", ACCUM),
    ("mean", ACCUM),
    ("mean", ACCUM),
    ("mean-flush", TAIL),
    ("items", ACCUM),
    ("items", ACCUM),
    ("items", ACCUM),
    ("no-items", ACCUM),
    ("items-last", TAIL),
)
# Measured max relative weight error: ZeRO 0 7.3e-8, 1 1.0e-7, 2 5.1e-8, 3 8.2e-8, 3 offloaded 5.1e-8, uneven 1.6e-8.
TOLERANCE = 1e-6


def _ds_config(setup: str) -> dict:
    zero: dict = {"stage": SETUPS[setup]}
    if zero["stage"] == 3:  # threshold 0 partitions every parameter (by default the test model's would stay whole)
        zero["stage3_param_persistence_threshold"] = 0
    config = {"zero_optimization": zero, "gradient_clipping": CLIP, "steps_per_print": 10**9}
    if setup.endswith("-offload"):  # a torch optimizer on the offloaded fp32 partitions: no CPU Adam to build
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def item_mask(window: int, kind: str) -> torch.Tensor:
    """Which samples of a window's global batch count as items: dense on rank 0, sparse on rank 1."""
    if kind == "no-items":
        return torch.zeros(GLOBAL_BATCH, dtype=torch.bool)
    generator = torch.Generator().manual_seed(100 + window)
    draws = torch.rand(GLOBAL_BATCH, generator=generator)
    per_rank = GLOBAL_BATCH // WORLD
    density = torch.cat([torch.full((per_rank,), 0.9), torch.full((per_rank,), 0.25)])
    mask = draws < density
    mask[per_rank + MICRO_BATCH : per_rank + 2 * MICRO_BATCH] = False  # rank 1's 2nd micro-batch: all padding
    mask[0] = True  # rank 0 always has items, so a window is never empty by chance
    return mask


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().mean(dim=1)


def window_samples(rank: int, micro_steps: int) -> slice:
    per_rank = GLOBAL_BATCH // WORLD
    return slice(rank * per_rank, rank * per_rank + micro_steps * MICRO_BATCH)


# ------------------------------------------------------------------------------------------ 2-rank worker
def _setdefault_deepspeed_env() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _naive_double_scaled_norm(engine, inputs: torch.Tensor, targets: torch.Tensor, rank: int) -> float:
    """Gradient norm when the loss is divided by accum_steps AND DeepSpeed divides it again (its default)."""
    rows = window_samples(rank, ACCUM)
    for index, (x, y) in enumerate(zip(inputs[rows].split(MICRO_BATCH), targets[rows].split(MICRO_BATCH), strict=True)):
        engine.set_gradient_accumulation_boundary(index == ACCUM - 1)
        engine.backward(loss_fn(engine(x), y) / ACCUM)  # scale_wrt_gas=True: DeepSpeed's default
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads))
    engine.zero_grad()
    return norm


@contextlib.contextmanager
def _count_reductions(counter: list[int]) -> Iterator[None]:
    """Counts the gradient reductions DeepSpeed issues (through torch.distributed) inside the block."""
    import torch.distributed as torch_dist
    from deepspeed.comm import comm as ds_comm

    # DeepSpeed's torch backend binds torch's reduce_scatter_tensor once, at start-up: ZeRO 3 reduce-scatters
    # through that reference, which a patch of torch.distributed does not see.
    with (
        count_calls(torch_dist, ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter"), counter),
        count_calls(ds_comm.cdb, ("reduce_scatter_function",), counter),
    ):
        yield


def _train_stage(rank: int, setup: str) -> dict:
    import deepspeed  # noqa: F401  (imported before the Accumulator picks the backend, as a user would)

    from distaccum.integrations.deepspeed import initialize

    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    engine = initialize(model, optimizer, plan, _ds_config(setup))
    acc = Accumulator(engine, engine.optimizer, plan, max_grad_norm=CLIP)
    inputs, targets = make_data(len(WINDOWS), GLOBAL_BATCH)
    naive_norm = _naive_double_scaled_norm(engine, inputs[0], targets[0], rank) if setup == "zero0" else None
    steps = []
    inside_window_reductions, window_reductions = [0], [0]
    for window, (kind, micro_steps) in enumerate(WINDOWS):
        rows = window_samples(rank, micro_steps)
        mask = item_mask(window, kind)[rows]
        batches = zip(
            inputs[window][rows].split(MICRO_BATCH),
            targets[window][rows].split(MICRO_BATCH),
            mask.split(MICRO_BATCH),
            strict=True,
        )
        for index, (x, y, m) in enumerate(batches):
            last = kind == "items-last" and index == micro_steps - 1
            counting = window == 1 and not acc.is_boundary  # window 0 also holds the ranks' start-up check
            with (
                _count_reductions(inside_window_reductions) if counting else contextlib.nullcontext(),
                _count_reductions(window_reductions) if window == 1 else contextlib.nullcontext(),
                acc.micro_step(last=last),
            ):
                output = engine(x)
                if kind == "mean" or kind == "mean-flush":
                    acc.backward(loss_fn(output, y))
                else:
                    count = int(m.sum())
                    acc.backward((per_sample_loss(output, y) * m).sum() / max(count, 1), num_items=count)
        if kind == "mean-flush":
            assert acc.micro_step_in_window == TAIL and not acc.stepped
            acc.flush()
        result = acc.last_step
        assert result is not None and result.step == window + 1
        steps.append({"result": result, "weights": full_weights(engine)})
    backend = acc.backend
    del acc, engine, optimizer, model
    return {
        "backend": backend,
        "steps": steps,
        "naive_norm": naive_norm,
        "inside_window_reductions": inside_window_reductions[0],
        "window_reductions": window_reductions[0],
        "native_window_reductions": _native_window_reductions(rank, setup),
    }


def _native_window_reductions(rank: int, setup: str) -> int:
    """Reductions in one full window of DeepSpeed's own accumulation (engine.backward + engine.step on every
    micro-batch, its own boundary counter), after a warm-up window: what distaccum must not exceed."""
    from distaccum.integrations.deepspeed import initialize

    model = make_model()
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    engine = initialize(model, make_optimizer("sgd", model.parameters()), plan, _ds_config(setup))
    inputs, targets = make_data(2, GLOBAL_BATCH)
    counter = [0]
    for window in range(2):
        rows = window_samples(rank, ACCUM)
        for x, y in zip(inputs[window][rows].split(MICRO_BATCH), targets[window][rows].split(MICRO_BATCH), strict=True):
            with _count_reductions(counter) if window == 1 else contextlib.nullcontext():
                engine.backward(loss_fn(engine(x), y))
                engine.step()
    del engine, model
    return counter[0]


def _all_stages_worker(rank: int, world_size: int) -> dict:
    _setdefault_deepspeed_env()
    results = {}
    for setup in SETUPS:
        started = time.monotonic()
        results[setup] = _train_stage(rank, setup)
        results[setup]["seconds"] = time.monotonic() - started
    return results


# ------------------------------------------------------------------------------------------- reference
def reference_steps(*, equal_micro_batches: bool = False) -> list[dict]:
    """One process, the same windows: each step's loss over exactly the samples (and items) the ranks saw.

    ``equal_micro_batches``: instead, average the micro-batches' item means (the error num_items fixes).
    """
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    inputs, targets = make_data(len(WINDOWS), GLOBAL_BATCH)
    steps = []
    for window, (kind, micro_steps) in enumerate(WINDOWS):
        rows = torch.cat([torch.arange(GLOBAL_BATCH)[window_samples(rank, micro_steps)] for rank in range(WORLD)])
        x, y = inputs[window][rows], targets[window][rows]
        mask = item_mask(window, kind)[rows]
        if kind == "no-items":
            steps.append({"norm": None, "weights": _weights(model), "loss": math.nan, "items": 0})
            continue
        optimizer.zero_grad()
        if kind.startswith("mean"):
            loss = loss_fn(model(x), y)
        elif equal_micro_batches:
            chunks = zip(per_sample_loss(model(x), y).split(MICRO_BATCH), mask.split(MICRO_BATCH), strict=True)
            loss = torch.stack([(part * m).sum() / m.sum().clamp_min(1) for part, m in chunks]).mean()
        else:
            loss = (per_sample_loss(model(x), y) * mask).sum() / mask.sum()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        optimizer.step()
        steps.append({"norm": norm, "weights": _weights(model), "loss": loss.item(), "items": int(mask.sum())})
    return steps


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def stage_runs() -> dict:
    started = time.monotonic()
    runs = run_ranks(_all_stages_worker, timeout_s=280)  # ~25 s here; the test's own timeout is 300 s
    print(f"\n2-rank DeepSpeed ZeRO 0 to 3 run: {time.monotonic() - started:.1f} s wall")
    return {"ranks": runs, "reference": reference_steps()}


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_zero_stage_equals_real_batch_every_step(stage_runs: dict, setup: str) -> None:
    reference = stage_runs["reference"]
    clipped = [step["norm"] is not None and step["norm"] > CLIP for step in reference]
    assert any(clipped) and not all(clipped), "the run must exercise both clipped and unclipped steps"
    for rank, run in enumerate(stage_runs["ranks"]):
        ours = run[setup]
        assert ours["backend"] == "deepspeed"
        errors = [
            max_relative_error(step["weights"], ref["weights"])
            for step, ref in zip(ours["steps"], reference, strict=True)
        ]
        print(f"{setup} rank {rank}: max rel weight error per step {[f'{e:.1e}' for e in errors]}")
        assert max(errors) <= TOLERANCE, (WINDOWS, errors)
        for (kind, _), step, ref in zip(WINDOWS, ours["steps"], reference, strict=True):
            result = step["result"]
            if kind == "no-items":
                assert result.skipped and result.num_items == 0 and result.grad_norm is None
                continue
            assert not result.skipped, kind
            # Gradient norm before clipping equals the real batch's: a loss scaled twice by accum_steps fails here.
            assert result.grad_norm == pytest.approx(ref["norm"], rel=TOLERANCE), kind
            assert result.loss == pytest.approx(ref["loss"], rel=TOLERANCE), kind
            if kind.startswith("items"):
                assert result.num_items == ref["items"]


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_reductions_inside_the_window(stage_runs: dict, setup: str) -> None:
    # ZeRO 0/1 reduce once per optimizer step, at the boundary; ZeRO 2 and 3 reduce-scatter every micro-batch into
    # their gradient partitions by design (it is how they partition them), which the README states.
    counts = [run[setup]["inside_window_reductions"] for run in stage_runs["ranks"]]
    print(f"{setup}: reductions in the {ACCUM - 1} non-boundary micro-steps of a window, per rank: {counts}")
    if SETUPS[setup] < 2:
        assert counts == [0, 0]
    else:
        assert all(count >= ACCUM - 1 for count in counts)


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_a_window_reduces_what_deepspeeds_own_accumulation_reduces_plus_one_scalar(stage_runs: dict, setup: str):
    # Once per optimizer step, exactly: the same gradient reductions as DeepSpeed driving its own window, plus
    # the one scalar all-reduce of the window's item count, loss and step check.
    for run in stage_runs["ranks"]:
        ours, native = run[setup]["window_reductions"], run[setup]["native_window_reductions"]
        print(f"{setup}: reductions per window, distaccum {ours}, DeepSpeed alone {native}")
        assert native >= 1 and ours == native + 1, (setup, ours, native)


@pytest.mark.slow
def test_deepspeed_would_divide_by_accum_steps_twice_without_scale_wrt_gas_false(stage_runs: dict) -> None:
    # The control: the same first window with DeepSpeed's default engine.backward(loss) on top of the 1/accum_steps
    # every hand-written loop applies gives a gradient accum_steps times too small; the accumulator's is exact.
    reference_norm = stage_runs["reference"][0]["norm"]
    for run in stage_runs["ranks"]:
        naive = run["zero0"]["naive_norm"]
        print(f"double-scaled norm {naive:.6g} vs real batch {reference_norm:.6g} (ratio {reference_norm / naive:.4g})")
        assert naive * ACCUM == pytest.approx(reference_norm, rel=1e-5)
        assert run["zero0"]["steps"][0]["result"].grad_norm == pytest.approx(reference_norm, rel=TOLERANCE)


def test_items_weighting_matters_for_this_data() -> None:
    # Guard on the test data: with these ragged item counts, weighting micro-batches equally (what a loop without
    # num_items does) ends far from the item-weighted run, so the equality above really checks num_items.
    exact = reference_steps()[-1]["weights"]
    naive = reference_steps(equal_micro_batches=True)[-1]["weights"]
    error = max_relative_error(naive, exact)
    print(f"equal-weighted micro-batches vs exact item weighting: max rel weight error {error:.2e}")
    assert error > 1e-3


# ---------------------------------------- ZeRO 3 per-rank bodies (run in spawned processes under run_ranks)
# MICRO_BATCH and WORLD as above; ZeRO 3's own window:
ZERO3_ACCUM = 3
ZERO3_GLOBAL_BATCH = ZERO3_ACCUM * MICRO_BATCH * WORLD  # 24
# Micro-batches each rank's loader holds: rank 1 runs out two micro-batches into the second window.
RANK_MICRO_BATCHES = (8, 5)
# What every rank trains on, per window: (3, 2).
COMMON_MICRO_BATCHES = (ZERO3_ACCUM, min(RANK_MICRO_BATCHES) - ZERO3_ACCUM)
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
    plan = BatchPlan(global_batch_size=ZERO3_GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
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
    batches = list(zip(inputs.split(MICRO_BATCH), targets.split(MICRO_BATCH), strict=False))[:ZERO3_ACCUM]
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


# ------------------------------------------------------------------------- ZeRO 3: uneven ranks, checkpoints
@pytest.mark.slow
def test_zero3_uneven_ranks_through_iterate_run_the_same_forwards_and_equal_the_real_batch() -> None:
    # Rank 0 holds 8 micro-batches, rank 1 holds 5 (accum_steps 3): iterate() cuts the second window to 2 on both,
    # so both run 5 forwards (ZeRO 3 all-gathers in each; a 6th on rank 0 alone would wait forever: the timeout
    # turns that into a failure) and the step is the real batch of those 2 x 2 micro-batches.
    started = time.monotonic()
    ranks = run_ranks(uneven_worker, timeout_s=120)
    print(f"\nZeRO 3 uneven run: {time.monotonic() - started:.1f} s wall")
    reference = reference_uneven()
    for rank, run in enumerate(ranks):
        assert run["forwards"] == sum(COMMON_MICRO_BATCHES), run["forwards"]
        assert run["dropped"] == DROPPED[rank]
        assert run["flushed"] is None  # the short window ended on its last micro-batch
        assert [step["micro_steps"] for step in run["steps"]] == [WORLD * m for m in COMMON_MICRO_BATCHES]
        errors = [max_relative_error(step["weights"], ref) for step, ref in zip(run["steps"], reference, strict=True)]
        print(f"ZeRO 3 uneven rank {rank}: max rel weight error per step {[f'{e:.1e}' for e in errors]}")
        assert max(errors) <= TOLERANCE


@pytest.mark.slow
def test_zero3_mid_window_checkpoint_is_refused_with_the_way_out(tmp_path: Path) -> None:
    ranks = run_ranks(mid_window_checkpoint_worker, str(tmp_path), timeout_s=120)
    for run in ranks:
        assert re.search(
            r"mid-window \(micro-step 1 of 3\) of a DeepSpeed engine: it keeps the window's gradients in ZeRO's "
            r"private buffers.*Save right after an optimizer step",
            run["refusals"]["save"] or "",
        ), run["refusals"]
        assert re.search(
            r"include_grads=True at micro-step 1 of 3: deepspeed keeps .* Checkpoint at a window boundary",
            run["refusals"]["state_dict"] or "",
        ), run["refusals"]
        assert run["written"] == [] and run["steps"] == 1  # nothing written; the window still stepped


def test_zero3_flush_under_offload_without_finalize_is_refused_with_the_way_out() -> None:
    # A DeepSpeed without finalize_gradient_accumulation_boundary() (0.19.8 has it): its ZeRO 3 optimizer offload
    # copies the gradients only in a boundary backward, so a flush after a non-boundary one would step on stale ones.
    from types import SimpleNamespace

    from distaccum.backends.deepspeed import DeepSpeedBackend

    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)  # no engine to build: only these four calls are made
    backend.engine = SimpleNamespace(
        zero_optimization_stage=lambda: 3,
        zero_cpu_offload=lambda: True,
        optimizer=object(),
        set_gradient_accumulation_boundary=lambda is_boundary: None,
    )
    backend.stage = 3  # what __init__ reads from the engine
    with pytest.raises(
        ValueError,
        match=r"offload copies the gradients only in a boundary backward.*acc\.micro_step\(last=True\) or acc\.iterate",
    ):
        backend.reduce_pending([])


# ------------------------------------------------------------------------------ config checks (no ranks)
def _plan(world_size: int = 2) -> BatchPlan:
    return BatchPlan(global_batch_size=32, micro_batch_size=8, world_size=world_size)


@pytest.mark.parametrize(
    ("section", "refusal"),
    [
        ({"zero_optimization": {"stage": 4}}, r"stage is 4, which is not a ZeRO stage.*stages 0 to 3"),
        ({"fp16": {"enabled": True}}, r"stage 0 with fp16 .* Use ZeRO stage 1 or 2 for mixed precision"),
        ({"bf16": {"enabled": True}}, r"stage 0 with bf16 .* Use ZeRO stage 1 or 2 for mixed precision"),
        (
            {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
            r"selects BF16_Optimizer, which has no loss scaler.*Leave grad_accum_dtype unset",
        ),
    ],
    ids=["zero4", "zero0-fp16", "zero0-bf16", "zero1-bf16-fp32-accum"],
)
def test_config_that_cannot_be_driven_exactly_is_refused_before_the_engine_is_built(section, refusal) -> None:
    from distaccum.integrations.deepspeed import reconcile_config

    with pytest.raises(ValueError, match=refusal):
        reconcile_config({"zero_optimization": {"stage": 0}, **section}, _plan())


def test_a_pipeline_module_is_refused_before_anything_starts() -> None:
    from deepspeed.pipe import PipelineModule

    from distaccum.integrations.deepspeed import initialize

    pipeline = PipelineModule.__new__(PipelineModule)  # only its type matters: the refusal comes first
    with pytest.raises(ValueError, match=r"PipelineModule: its engine runs its own micro-batch schedule"):
        initialize(pipeline, None, _plan(world_size=1), {})


def test_configs_that_work_pass_the_checks() -> None:
    from distaccum.integrations.deepspeed import reconcile_config

    for config in (
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
        {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
        {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
        {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}},
        {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
    ):
        assert reconcile_config(config, _plan())["zero_optimization"] == config["zero_optimization"]


def test_config_batch_fields_filled_from_plan() -> None:
    from distaccum.integrations.deepspeed import reconcile_config

    config = {"train_batch_size": "auto", "zero_optimization": {"stage": 1}}
    filled = reconcile_config(config, _plan())
    assert filled["train_batch_size"] == 32
    assert filled["train_micro_batch_size_per_gpu"] == 8
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["gradient_clipping"] == 0.0  # not DeepSpeed's silent 1.0
    assert filled["zero_allow_untested_optimizer"] is True
    assert config == {"train_batch_size": "auto", "zero_optimization": {"stage": 1}}  # input untouched


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (
            {"train_batch_size": 64},
            r"train_batch_size 64 \(the plan's global_batch_size is 32\).*here 32 = 2 x 8 x 2",
        ),
        (
            {"train_micro_batch_size_per_gpu": 4},
            r"train_micro_batch_size_per_gpu 4 \(the plan's micro_batch_size is 8\)",
        ),
        (
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4},
            r"gradient_accumulation_steps 4 \(the plan's accum_steps is 2\).*here 32 = 2 x 8 x 2",
        ),
    ],
)
def test_config_batch_mismatch_raises_with_equation(fields: dict, pattern: str) -> None:
    from distaccum.integrations.deepspeed import reconcile_config

    with pytest.raises(ValueError, match=pattern):
        reconcile_config(fields, _plan())


def test_config_clipping_kept_or_rejected() -> None:
    from distaccum.integrations.deepspeed import reconcile_config

    assert reconcile_config({"gradient_clipping": 1.0}, _plan())["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match=r"gradient_clipping must be a number >= 0.*got -1"):
        reconcile_config({"gradient_clipping": -1}, _plan())


def test_load_config_errors_and_comments(tmp_path: Path) -> None:
    from distaccum.integrations.deepspeed import load_config

    with pytest.raises(ValueError, match=r"does not exist"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        load_config(broken)
    commented = tmp_path / "commented.json"
    commented.write_text(json.dumps({"_comment": "why", "train_batch_size": 32}))
    assert load_config(commented) == {"train_batch_size": 32}


def test_initialize_refuses_mismatched_config_before_starting() -> None:
    pytest.importorskip("deepspeed")  # a test dependency; present in every venv launch/dev.sh builds
    from distaccum.integrations.deepspeed import initialize

    model = make_model()
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps 3 \(the plan's accum_steps is 2\)"):
        initialize(model, make_optimizer("sgd", model.parameters()), _plan(), {"gradient_accumulation_steps": 3})


def test_missing_deepspeed_names_the_pip_command() -> None:
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"  # what an absent package looks like to `import deepspeed`
        "from distaccum import BatchPlan\n"
        "from distaccum.integrations.deepspeed import initialize\n"
        "try:\n"
        "    initialize(None, None, BatchPlan(global_batch_size=2, micro_batch_size=1, world_size=1), {})\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert 'pip install "distaccum[deepspeed]"' in done.stdout, done.stderr


def test_single_process_engine_refuses_clipping_mismatch() -> None:
    # One process without a launcher (`python train.py --deepspeed ...`): initialize() makes its own 1-rank group.
    pytest.importorskip("deepspeed")
    _setdefault_deepspeed_env()
    from distaccum import dist
    from distaccum.integrations.deepspeed import initialize

    plan = BatchPlan(global_batch_size=8, micro_batch_size=4, world_size=1)
    model = make_model()
    engine = initialize(model, make_optimizer("sgd", model.parameters()), plan, {"gradient_clipping": 1.0})
    try:
        assert engine.gradient_accumulation_steps() == 2 and engine.gradient_clipping() == 1.0
        # Refused when the accumulator is built (it was at the first step, after a window's work; issue 26).
        with pytest.raises(ValueError, match=r"max_grad_norm=None\).*gradient_clipping 1.*Pass max_grad_norm=1"):
            Accumulator(engine, engine.optimizer, plan)  # max_grad_norm=None: no clipping wanted
        Accumulator(engine, engine.optimizer, plan, max_grad_norm=1.0)  # agreeing: accepted
    finally:
        del engine
        dist.shutdown()


# --------------------------------------------------------------------------------------------- launch files
def _train_defaults() -> dict:
    spec = importlib.util.spec_from_file_location("examples_train", ROOT / "examples" / "train.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return vars(module.parse_args([]))
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.parametrize("stage", CONFIG_STAGES)
def test_launch_config_agrees_with_train_defaults(stage: int) -> None:
    from distaccum.integrations.deepspeed import load_config, reconcile_config

    defaults = _train_defaults()
    plan = BatchPlan(
        global_batch_size=defaults["global_batch_size"], micro_batch_size=defaults["micro_batch_size"], world_size=2
    )
    config = load_config(CONFIG_DIR / f"zero{stage}.json")
    assert config["zero_optimization"]["stage"] == stage
    assert "gradient_clipping" in config  # explicit: DeepSpeed's default would clip at 1.0
    assert config["zero_allow_untested_optimizer"] is True
    assert reconcile_config(config, plan) == {**config}  # nothing to fill, nothing to correct


def test_accelerate_deepspeed_yaml_matches_json() -> None:
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    launch = load_config_from_file(str(ROOT / "launch" / "accelerate" / "deepspeed.yaml"))
    assert launch.distributed_type == DistributedType.DEEPSPEED
    json_path = ROOT / launch.deepspeed_config["deepspeed_config_file"]
    assert json_path.parent == CONFIG_DIR and json_path.is_file()
    # With a config file the batch and clipping must come from the JSON alone (Accelerate refuses both).
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(launch.deepspeed_config)
    config = json.loads(json_path.read_text())
    assert config["train_batch_size"] == (
        config["gradient_accumulation_steps"] * config["train_micro_batch_size_per_gpu"] * launch.num_processes
    )
    # No mixed_precision key, or "no": with a deepspeed_config_file the precision lives in the JSON.
    assert launch.mixed_precision in (None, "no") and not config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    # Accelerate's own processing of the JSON (no transformers needed for this part).
    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path), zero3_init_flag=False)
    assert plugin.gradient_accumulation_steps == config["gradient_accumulation_steps"]
    assert plugin.gradient_clipping == 0.0
    assert plugin.zero_stage == config["zero_optimization"]["stage"]


# -------------------------------------------------------------------- examples/train.py through launchers
LAUNCH_STEPS = 3


def _train_reference() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import task
    finally:
        sys.path.remove(str(ROOT / "examples"))
    defaults = _train_defaults()
    model = task.make_model(defaults["seed"])
    optimizer = torch.optim.SGD(model.parameters(), lr=defaults["lr"], momentum=0.9)
    for step in range(LAUNCH_STEPS):
        inputs, targets = task.global_batch(step, defaults["global_batch_size"], defaults["seed"])
        optimizer.zero_grad()
        task.loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return _weights(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "launcher"),
    [(0, "deepspeed"), (1, "torchrun"), (2, "torchrun"), (3, "torchrun")],
    ids=["zero0", "zero1", "zero2", "zero3"],
)
def test_train_example_under_launcher_equals_real_batch(tmp_path: Path, stage: int, launcher: str) -> None:
    port = str(free_port())
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        prefix = [
            str(bindir / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    else:
        prefix = [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    save = tmp_path / "weights.pt"
    command = [
        *prefix,
        str(ROOT / "examples" / "train.py"),
        "--deepspeed",
        str(CONFIG_DIR / f"zero{stage}.json"),
        "--steps",
        str(LAUNCH_STEPS),
        "--save",
        str(save),
    ]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    print(f"{launcher} ZeRO {stage}: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "backend=deepspeed" in done.stdout
    error = max_relative_error(torch.load(save), _train_reference())
    print(f"{launcher} ZeRO {stage}: max rel weight error vs real batch {error:.2e}")
    assert error <= TOLERANCE


def test_zero0_without_clipping_checks_nan_and_weights_items_in_one_pass() -> None:
    # No norm is computed (no clipping, none asked): the pass that applies the window factor checks for NaN/inf.
    from tests.helpers import nonfinite_workers as workers

    ranks = run_ranks(workers.zero0_unclipped, timeout_s=180)
    for result in ranks:
        assert [step["skipped"] for step in result["steps"]] == [False, True, False]
        assert math.isfinite(result["steps"][1]["loss"]) and result["steps"][1]["grad_norm"] is None
        assert all(torch.equal(result["weights"][0][k], v) for k, v in result["weights"][1].items())
    # One process, the same samples: window 1 averaged, window 2 skipped, window 3 weighted by its items.
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    inputs, targets = make_data(2 * workers.WINDOWS * WORLD, workers.MICRO)
    for indices in (range(0, 4), range(8, 12)):
        optimizer.zero_grad()
        if indices.start == 0:
            loss = loss_fn(model(inputs[0:4].flatten(0, 1)), targets[0:4].flatten(0, 1))
        else:
            kept = [(inputs[i][: workers.ZERO0_ITEMS[i]], targets[i][: workers.ZERO0_ITEMS[i]]) for i in indices]
            loss = loss_fn(model(torch.cat([x for x, _ in kept])), torch.cat([y for _, y in kept]))
        loss.backward()
        optimizer.step()
    for result in ranks:
        assert max_relative_error(result["weights"][-1], model.state_dict()) <= TOLERANCE


def _raise_on_nonfinite(rank: int, world_size: int, stage: int) -> dict:
    """Three windows of 2 micro-steps under ``on_nonfinite="raise"``; rank 1's gradient turns NaN in window 2 (its
    loss stays finite). Returns, per window, whether it raised, and the weights after it."""
    import deepspeed  # noqa: F401  (imported before the Accumulator picks the backend, as a user would)

    from distaccum.integrations.deepspeed import initialize
    from tests.helpers.nonfinite_workers import poisoned_gradient

    _setdefault_deepspeed_env()
    plan = BatchPlan(micro_batch_size=4, accum_steps=2)
    config = {"zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    model = make_model()
    engine = initialize(model, make_optimizer("sgd", model.parameters()), plan, config)
    acc = Accumulator(engine, engine.optimizer, plan, on_nonfinite="raise")
    inputs, targets = make_data(2 * 3 * world_size, 4)
    raised, weights = [], []
    for window in range(3):
        try:
            for micro in range(2):
                index = (window * 2 + micro) * world_size + rank
                with acc.micro_step():
                    output = engine(inputs[index])
                    loss = loss_fn(output, targets[index])
                    if rank == 1 and window == 1 and micro == 0:
                        loss = poisoned_gradient(output, loss)
                    acc.backward(loss)
            raised.append(False)
        except FloatingPointError as error:
            raised.append(str(error))
        weights.append(full_weights(engine))
    return {"raised": raised, "weights": weights, "skipped": acc.skipped_steps, "steps": acc.optimizer_steps}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_on_nonfinite_raise_raises_on_every_rank_and_takes_no_step(stage: int) -> None:
    # Under DeepSpeed the NaN gradient was skipped silently whatever on_nonfinite said (ZeRO 0 decided it in its own
    # step; ZeRO 1 and 2 left it to the engine): "raise" must raise on every rank, as on every other backend.
    ranks = run_ranks(_raise_on_nonfinite, stage, timeout_s=180)
    for result in ranks:
        assert result["raised"][0] is False and result["raised"][2] is False
        assert "non-finite gradient" in result["raised"][1] and "optimizer step 2" in result["raised"][1]
        assert result["steps"] == 3 and result["skipped"] == 1
        before, after = result["weights"][0], result["weights"][1]
        assert all(torch.equal(before[name], after[name]) for name in before), "the NaN step reached the weights"
        assert all(torch.isfinite(value).all() for value in result["weights"][2].values())
    assert all(torch.equal(ranks[0]["weights"][2][k], v) for k, v in ranks[1]["weights"][2].items())
