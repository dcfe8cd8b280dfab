"""Faults and bad input: exact resume mid-window, elastic world size, killed and stalled ranks, disagreeing ranks,
non-finite gradients and uneven data, each ending in a clear error or the documented recovery, never a hang.

Where training continues after the fault, the final weights are compared with a run that never met it.

The per-rank bodies at the end taking ``(rank, world_size, ...)`` run under ``tests.helpers.spawn.run_ranks``. Run as
a module (``python -m tests.distributed.test_faults CASE TIMEOUT_S``) this file is one rank of a job whose rendezvous
comes from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), where rank 1 misbehaves at
micro-step ``FAULT_AT`` and rank 0 prints one JSON line saying how it ended.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan, checkpoint, dist
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, max_relative_error
from tests.helpers.launchers import free_port
from tests.helpers.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
EXACT = 1e-6  # the acceptance bound; same-world-size resumes are in fact bit-identical


# --------------------------------------------------------------------------------------- exact resume mid-window
@pytest.fixture(scope="module")
def mid_window_resumes() -> tuple[list[dict], list[dict]]:
    uninterrupted = run_ranks(save_at_every_micro_step, timeout_s=120)
    snapshots = [result["snapshots"] for result in uninterrupted]
    resumed = run_ranks(resume_from_snapshots, snapshots, timeout_s=120)
    return uninterrupted, resumed


def test_ddp_resume_at_every_micro_step_ends_with_the_uninterrupted_weights(mid_window_resumes):
    uninterrupted, resumed = mid_window_resumes
    points = len(uninterrupted[0]["snapshots"])
    assert points == STEPS * ACCUM  # mid-window (1, 2 of 3) and boundary points alike
    for rank in range(2):
        assert len(resumed[rank]["finals"]) == points
        for final in resumed[rank]["finals"]:
            assert max_relative_error(final, uninterrupted[0]["final"]) <= EXACT
    # The saved mid-window gradients are each rank's own (unreduced, different per rank).
    grads = [result["snapshots"][1]["accumulator"]["grads"] for result in uninterrupted]
    assert not torch.equal(grads[0][0], grads[1][0])


def test_mid_window_resume_without_gradients_warns_and_loses_them(mid_window_resumes):
    uninterrupted, resumed = mid_window_resumes
    assert any(
        "without its gradients: the window's first 2 micro-batches are lost" in w for w in resumed[0]["warnings"]
    )
    assert max_relative_error(resumed[0]["without_grads"], uninterrupted[0]["final"]) > 1e-3


def test_fsdp_mid_window_gradients_are_refused_with_the_way_out(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=4, accum_steps=2))
    x, y = make_data(1, 4)
    assert acc.state_dict(include_grads=True).get("grads") is None  # at a boundary there is nothing to keep
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]))
    with pytest.raises(ValueError, match=r"include_grads=True at micro-step 1 of 2: fsdp2 keeps .* window boundary"):
        acc.state_dict(include_grads=True)
    with pytest.raises(ValueError, match=r"include_grads=True at micro-step 1 of 2: fsdp2 keeps"):
        checkpoint.save(tmp_path / "ckpt", model=model, optimizer=acc.optimizer, accumulator=acc, include_grads=True)
    with pytest.raises(ValueError, match=r"mid-window \(micro-step 1 of 2\).* or pass include_grads=True"):
        checkpoint.save(tmp_path / "ckpt", model=model, optimizer=acc.optimizer, accumulator=acc)
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written
    del model, acc


# ------------------------------------------------------------------------------------------- elastic world size
def _single_process_run(boundary_state: dict | None, boundary_step: int) -> dict:
    """The world-size-1 counterpart of elastic_run, in this process."""
    inner, model, optimizer, acc = _build(1, MICRO * ACCUM * 2)
    kept: dict = {}

    def keep(step: int, done_in_window: int) -> None:
        if acc.stepped and acc.optimizer_steps == boundary_step:
            kept.update(
                model={k: v.clone() for k, v in inner.state_dict().items()},
                optimizer=torch.load(_roundtrip(optimizer.state_dict()), weights_only=False),
                accumulator=acc.state_dict(include_grads=True),
            )

    _train(0, 1, model, acc, on_micro_step=keep)
    result: dict = {"uninterrupted": {k: v.clone() for k, v in inner.state_dict().items()}, "boundary_state": kept}
    if boundary_state is not None:
        inner, model, optimizer, acc = _build(1, MICRO * ACCUM * 2)
        inner.load_state_dict(boundary_state["model"])
        optimizer.load_state_dict(boundary_state["optimizer"])
        acc.load_state_dict(boundary_state["accumulator"])
        result["resumed_accum_steps"] = acc.plan.accum_steps
        _train(0, 1, model, acc, start=(boundary_step, 0))
        result["resumed"] = {k: v.clone() for k, v in inner.state_dict().items()}
        result["steps"] = acc.optimizer_steps
    return result


@pytest.fixture(scope="module")
def elastic_runs() -> tuple[dict, list[dict], dict]:
    boundary_step = 1
    one = _single_process_run(None, boundary_step)
    two = run_ranks(elastic_run, one["boundary_state"], boundary_step, timeout_s=120)
    one_resumed = _single_process_run(two[0]["boundary_state"], boundary_step)
    return one, two, one_resumed


def test_boundary_checkpoint_from_one_rank_resumes_on_two_with_the_same_weights(elastic_runs):
    one, two, _ = elastic_runs
    for rank_result in two:
        assert rank_result["resumed_accum_steps"] == ACCUM  # re-planned: 6 on one rank, 3 on two
        assert rank_result["steps"] == STEPS
        assert max_relative_error(rank_result["resumed"], one["uninterrupted"]) <= EXACT


def test_boundary_checkpoint_from_two_ranks_resumes_on_one_with_the_same_weights(elastic_runs):
    _, two, one_resumed = elastic_runs
    assert one_resumed["resumed_accum_steps"] == 2 * ACCUM and one_resumed["steps"] == STEPS
    assert max_relative_error(one_resumed["resumed"], two[0]["uninterrupted"]) <= EXACT
    # and the two sizes really are different runs of the same training, not one copied into the other
    assert 0 < max_relative_error(two[0]["uninterrupted"], one_resumed["uninterrupted"]) <= EXACT


def test_mid_window_checkpoint_cannot_change_world_size():
    model = make_model()
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(global_batch_size=24, micro_batch_size=4)
    )
    state = acc.state_dict()
    state.update(plan=BatchPlan(global_batch_size=24, micro_batch_size=4, world_size=2).as_dict(), micro_step=1)
    with pytest.raises(ValueError, match=r"mid-window \(micro-step 1 of 3\) on 2 rank\(s\) and cannot resume on 1"):
        acc.load_state_dict(state)


def test_checkpoint_with_another_micro_batch_is_refused():
    model = make_model()
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(global_batch_size=24, micro_batch_size=4)
    )
    state = acc.state_dict()
    state["plan"] = BatchPlan(global_batch_size=24, micro_batch_size=6, world_size=1).as_dict()
    with pytest.raises(
        ValueError, match=r"checkpoint was made with plan \(global_batch_size 24 = accum_steps 4 x micro"
    ):
        acc.load_state_dict(state)


def test_saved_gradients_that_do_not_fit_the_model_are_refused():
    model = make_model()
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(global_batch_size=8, micro_batch_size=4)
    )
    state = {**acc.state_dict(), "micro_step": 1, "grads": [torch.zeros(3)]}
    with pytest.raises(ValueError, match=r"saved gradients \(1 tensors\) do not fit this optimizer's 6 parameters"):
        acc.load_state_dict(state)


# --------------------------------------------------------------------------------------- ranks that disagree
def test_ranks_that_disagree_on_position_or_step_fail_on_every_rank():
    messages = run_ranks(disagreements, timeout_s=90)
    for rank_messages in messages:
        position, step = rank_messages
        assert "rank 1 has micro_step=1 where rank 0 has 0" in position
        assert "ranks disagree on the optimizer step at a window boundary" in step
    assert "this rank: 7" in messages[1][1] and "this rank: 0" in messages[0][1]


# --------------------------------------------------------------------------------------------------- non-finite
def real_batches_of_windows_1_and_3() -> dict[str, torch.Tensor]:
    """One process on the real batches of windows 1 and 3 of the 2-rank fault workers (window 2 skipped)."""
    reference = make_model()
    optimizer = make_optimizer("sgd", reference.parameters())
    inputs, targets = make_data(2 * STEPS, MICRO)
    for window in (0, 2):
        optimizer.zero_grad()
        loss_fn(
            reference(inputs[2 * window : 2 * window + 2].reshape(-1, inputs.shape[-1])),
            targets[2 * window : 2 * window + 2].reshape(-1, targets.shape[-1]),
        ).backward()
        optimizer.step()
    return reference.state_dict()


def test_nan_on_one_rank_skips_the_step_on_both_or_raises_on_both():
    results = run_ranks(nan_on_one_rank, timeout_s=90)
    for result in results:
        steps = result["skip"]["after_step"]
        assert [step.skipped for step, _ in steps] == [False, True, False]
        assert result["skip"]["skipped_steps"] == 1
        assert all(torch.equal(steps[0][1][k], steps[1][1][k]) for k in steps[0][1])  # step 2 changed nothing
        assert "non-finite gradient at optimizer step 2" in result["raise"]["error"]
        assert result["raise"]["steps"] == (2, 1)  # the raised step counts as the skipped step it is
    finals = [result["skip"]["after_step"][-1][1] for result in results]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # the ranks stay identical
    # Nothing else lost: the same as training on windows 1 and 3 only.
    assert max_relative_error(finals[0], real_batches_of_windows_1_and_3()) <= EXACT


def test_overflow_in_one_fsdp1_shard_skips_the_step_on_every_rank_with_a_grad_scaler():
    # torch.amp.GradScaler checks only this rank's shard: the skip must come from the global norm, or rank 0
    # steps while rank 1 skips and the scales drift apart.
    results = run_ranks(overflow_on_one_fsdp1_shard, timeout_s=90)
    for result in results:
        assert result["skipped"] == [False, True, False], result["skipped"]
    assert results[0]["scale"] == results[1]["scale"] and results[0]["scale"][1] == 2.0**9
    for result in results:  # the overflowed step changed no rank's shard, and the weights stay finite
        before, after = result["local_weights"][0], result["local_weights"][1]
        assert all(torch.equal(x, y) and torch.isfinite(y).all() for x, y in zip(before, after, strict=True))


@pytest.mark.parametrize("fail_index", [0, 1], ids=["inside-window", "at-boundary"])
def test_an_exception_on_one_rank_discards_the_window_on_every_rank(fail_index):
    results = run_ranks(exception_on_one_rank, fail_index, timeout_s=90)
    for result in results:
        assert result["skipped"] == [False, True, False], result["skipped"]
    assert all(torch.equal(results[0]["weights"][k], results[1]["weights"][k]) for k in results[0]["weights"])
    assert max_relative_error(results[0]["weights"], real_batches_of_windows_1_and_3()) <= EXACT


# -------------------------------------------------------------------------------------------------- uneven data
def test_uneven_data_across_ranks_ends_with_a_short_window_instead_of_a_hang():
    counts = (7, 5)  # micro-batches per rank; accum_steps 2
    results = run_ranks(uneven_data, counts, timeout_s=90)
    data = [make_data(max(counts), MICRO, seed=10 + rank) for rank in range(2)]

    def reference(windows: list[list[int]]) -> dict:
        model = make_model()
        optimizer = make_optimizer("sgd", model.parameters())
        for window in windows:
            inputs = torch.cat([data[rank][0][index] for rank in range(2) for index in window])
            targets = torch.cat([data[rank][1][index] for rank in range(2) for index in window])
            optimizer.zero_grad()
            loss_fn(model(inputs), targets).backward()
            optimizer.step()
        return model.state_dict()

    stepped = [result[False] for result in results]
    assert [result["micro_steps_per_step"] for result in stepped] == [[4, 4, 2]] * 2  # last window: 1 per rank
    assert [result["dropped"] for result in stepped] == [1, 0]  # rank 0's 6th micro-batch
    assert [result["read"] for result in stepped] == [6, 5]  # rank 0's 7th is never read
    for result in stepped:
        assert max_relative_error(result["state"], reference([[0, 1], [2, 3], [4]])) <= EXACT
    dropped = [result[True] for result in results]
    assert [result["micro_steps_per_step"] for result in dropped] == [[4, 4]] * 2
    assert [result["dropped"] for result in dropped] == [2, 1]
    for result in dropped:
        assert max_relative_error(result["state"], reference([[0, 1], [2, 3]])) <= EXACT


def test_iterate_needs_one_micro_step_per_micro_batch():
    model = make_model()
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=4, accum_steps=2))
    inputs, targets = make_data(3, 4)
    with pytest.raises(RuntimeError, match=r"acc.iterate\(\) yields one micro-batch per acc.micro_step\(\)"):
        for _ in acc.iterate(zip(inputs, targets, strict=True)):
            pass


def test_iterate_left_early_does_not_end_a_later_window():
    model = make_model()
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=4, accum_steps=2))
    inputs, targets = make_data(3, 4)
    for x, y in acc.iterate(zip(inputs, targets, strict=True)):
        if acc.optimizer_steps == 1:  # the next one would be the short last window's only micro-batch
            break
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    for x, y in zip(inputs[:2], targets[:2], strict=True):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    assert acc.optimizer_steps == 2 and acc.last_step.micro_steps == 2


# ------------------------------------------------------------------------------------ dead or stalled ranks
def _misbehaving_job(case: str, timeout_s: float) -> tuple[dict, float, list[int | None]]:
    """Two ranks of this module (its ``__main__``) joined through the environment; returns rank 0's report."""
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.distributed.test_faults", case, str(timeout_s)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    started = time.monotonic()
    try:
        out, err = processes[0].communicate(timeout=90)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    elapsed = time.monotonic() - started
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert reports, out + err
    return reports[0], elapsed, [process.returncode for process in processes]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("stall", r"Timed out waiting 3000ms"),
        ("exit", r"Connection (reset|closed) by peer"),
    ],
)
def test_a_rank_that_stalls_or_dies_makes_the_others_fail_within_the_timeout(case, expected):
    timeout_s = 3.0
    report, _, codes = _misbehaving_job(case, timeout_s)
    assert report["rank"] == 0 and codes[0] != 0
    assert re.search(expected, report["error"]), report
    # rank 0 waited at most the process-group timeout (plus scheduling slack) in the collective, not forever
    assert report["seconds_waited"] <= timeout_s + 5.0


def test_a_rank_that_flushes_while_the_others_train_fails_instead_of_hanging():
    # flush()'s scalar all-reduce meets the other rank's gradient all-reduce: gloo aborts the flushing rank on
    # the size mismatch, and the training rank sees its peer go at once, well before the 3 s timeout would fire
    # (a hang would end in "Timed out waiting 3000ms" after 3 s and fail here).
    timeout_s = 3.0
    report, _, codes = _misbehaving_job("flush", timeout_s)
    assert report["rank"] == 0 and re.search(r"Connection (reset|closed) by peer", report["error"]), report
    assert report["seconds_waited"] < timeout_s / 2
    # The flushing rank ended by itself (gloo's abort), not by the harness's SIGKILL after rank 0 was done.
    assert codes[0] != 0 and codes[1] not in (0, -signal.SIGKILL), codes


# ------------------------------------------------------------------------------- through distaccum.checkpoint
@pytest.fixture(scope="module")
def checkpoint_roundtrips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    directory = tmp_path_factory.mktemp("checkpoints")
    return directory, run_ranks(roundtrip_checkpoints, str(directory), timeout_s=180)


def test_checkpoint_helper_resumes_ddp_mid_window_exactly(checkpoint_roundtrips):
    directory, results = checkpoint_roundtrips
    assert sorted(path.name for path in (directory / "ddp" / "step-00000001-micro-0002").iterdir()) == [
        "grads-rank00000.pt",
        "grads-rank00001.pt",
        "meta.json",
        "state.pt",
    ]
    for result in results:
        assert max_relative_error(result["ddp"]["resumed"], result["ddp"]["uninterrupted"]) <= EXACT


def test_checkpoint_helper_saves_fsdp2_with_distributed_checkpoint_and_resumes_exactly(checkpoint_roundtrips):
    directory, results = checkpoint_roundtrips
    assert any((directory / "fsdp2" / "step-00000001" / "sharded").glob("*.distcp"))
    for result in results:
        assert max_relative_error(result["fsdp2"]["resumed"], result["fsdp2"]["uninterrupted"]) <= EXACT


def test_fsdp2_boundary_checkpoint_reshards_onto_one_rank(checkpoint_roundtrips, tmp_path):
    directory, results = checkpoint_roundtrips
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    resumed = train_with_checkpoint(0, 1, "fsdp2", str(directory / "fsdp2"), None)
    assert max_relative_error(resumed, results[0]["fsdp2"]["uninterrupted"]) <= EXACT


def test_mid_window_checkpoint_of_two_ranks_is_refused_on_one(checkpoint_roundtrips):
    directory, _ = checkpoint_roundtrips
    with pytest.raises(ValueError, match=r"taken mid-window \(micro-step 2 of 3\) on 2 rank\(s\) and cannot resume"):
        train_with_checkpoint(0, 1, "plain", str(directory / "ddp"), None)


def test_resume_plan_lists_the_world_sizes_that_can_resume(checkpoint_roundtrips):
    directory, _ = checkpoint_roundtrips
    assert checkpoint.resume_plan(directory / "fsdp2", world_size=6).accum_steps == 1
    with pytest.raises(
        ValueError, match=r"world_size 4 cannot keep global_batch_size 24 .* valid world sizes: 1, 2, 3, 6"
    ):
        checkpoint.resume_plan(directory / "fsdp2", world_size=4)


# -------------------------------------------------------------------------- a killed rank under torchrun
KILLED_RUN_STEPS = 60


def _kill_rank_one_after_the_first_checkpoint(directory: Path, *extra: str) -> dict:
    """examples/train.py on 2 ranks under torchrun --max-restarts 1; the test SIGKILLs rank 1 once the first
    checkpoint exists. Nothing in the training code knows about it."""
    import psutil

    from tests.helpers.examples import EXAMPLES, SIZES
    from tests.helpers.launchers import start

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), EXAMPLES / "train.py", *SIZES]
    command += ["--steps", str(KILLED_RUN_STEPS), "--checkpoint-dir", directory / "ckpt", "--checkpoint-every", "10"]
    command += ["--save", directory / "weights.pt", *extra]
    process = start(command)
    agent = psutil.Process(process.pid)
    try:
        deadline = time.monotonic() + 180
        while checkpoint.latest(directory / "ckpt") is None:
            assert process.poll() is None, "the job ended before its first checkpoint:\n" + process.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.01)
        victims = [
            child
            for child in agent.children(recursive=True)
            if "train.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == "1"
        ]
        assert len(victims) == 1, victims
        victims[0].kill()  # SIGKILL: no handler, no clean-up, as an OOM killer or a lost node would do it
        output, _ = process.communicate(timeout=240)
    finally:
        # torchrun starts each worker in its own session: a hang must not leave them behind.
        if process.poll() is None:
            for child in agent.children(recursive=True):
                child.kill()
            process.kill()
            process.communicate()
    return {"code": process.returncode, "output": output, "directory": directory}


@pytest.fixture(scope="module")
def killed_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _kill_rank_one_after_the_first_checkpoint(tmp_path_factory.mktemp("killed"))


def _assert_restarted_with_the_uninterrupted_weights(run: dict) -> None:
    from tests.helpers.examples import reference_weights

    output = run["output"]
    assert run["code"] == 0, output[-4000:]
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", output), output[-4000:]  # torchrun saw the kill
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert len(resumed) == 1 and 10 <= resumed[0] < KILLED_RUN_STEPS, output[-4000:]
    weights = torch.load(run["directory"] / "weights.pt", weights_only=True)
    assert max_relative_error(weights, reference_weights(KILLED_RUN_STEPS)) <= EXACT


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_last_checkpoint_with_the_same_weights(killed_rank_run):
    _assert_restarted_with_the_uninterrupted_weights(killed_rank_run)


@pytest.mark.slow
def test_a_killed_deepspeed_rank_restarts_from_the_last_checkpoint_with_the_same_weights(tmp_path: Path):
    # The same kill under DeepSpeed ZeRO 2: the engine's shards and distaccum's state come back from one checkpoint.
    zero2 = Path(__file__).resolve().parents[2] / "launch" / "deepspeed" / "zero2.json"
    run = _kill_rank_one_after_the_first_checkpoint(tmp_path, "--deepspeed", str(zero2))
    assert "backend=deepspeed" in run["output"]
    _assert_restarted_with_the_uninterrupted_weights(run)


@pytest.mark.slow
def test_the_two_rank_checkpoint_resumes_on_one_process_with_the_same_weights(killed_rank_run):
    from tests.helpers.examples import EXAMPLES, SIZES, reference_weights
    from tests.helpers.launchers import launch

    directory = killed_rank_run["directory"]
    steps = KILLED_RUN_STEPS + 5
    command = [sys.executable, EXAMPLES / "train.py", *SIZES, "--steps", str(steps)]
    output = launch([*command, "--checkpoint-dir", directory / "ckpt", "--save", directory / "elastic.pt"])
    assert f"at step {KILLED_RUN_STEPS}" in output and "accum_steps 4 x micro_batch_size 8 x world_size 1" in output
    weights = torch.load(directory / "elastic.pt", weights_only=True)
    assert max_relative_error(weights, reference_weights(steps)) <= EXACT


@pytest.mark.slow
def test_a_kill_soak_ends_with_the_uninterrupted_weights_and_every_step_once(tmp_path: Path) -> None:
    # SIGKILLs of a random rank inside windows, at boundaries and during checkpoint writes, under torchrun
    # --max-restarts (the long soak: python -m tests.helpers.kill_soak --kills 10).
    from tests.helpers.examples import reference_weights
    from tests.helpers.kill_soak import soak, uninterrupted

    steps, kills = 40, 3
    report = soak(tmp_path, kills=kills, steps=steps, seed=0, timeout_s=420)
    assert report["code"] == 0, report["output"][-4000:]
    assert len(report["kills"]) == kills, report["kills"]
    assert len(re.findall(r"failed \(exitcode: -9\)", report["output"])) == kills  # torchrun saw every kill
    assert report["final_step"] == steps  # the final state took every optimizer step, none twice
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    clean = torch.load(uninterrupted(tmp_path, steps=steps), weights_only=True)
    assert all(torch.equal(weights[k], clean[k]) for k in clean), "resumes must be bit-identical on 2 ranks"
    assert max_relative_error(weights, reference_weights(steps)) <= EXACT


# =====================================================================================================================
# Per-rank bodies (run in spawned processes under tests.helpers.spawn.run_ranks; _misbehaving_rank in
# _misbehaving_job's subprocesses, through the __main__ block below)
# =====================================================================================================================

MICRO = 4
ACCUM = 3  # on 2 ranks: global batch 24
STEPS = 3
FAULT_AT = 5


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {name: value.detach().clone() for name, value in state.items()}


def rank_slice(step: int, rank: int, world_size: int, global_batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """This rank's micro-batches of step ``step``: the same samples in the same order for any world size."""
    inputs, targets = make_data(STEPS + 2, global_batch_size)
    per_rank = global_batch_size // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return list(zip(inputs[step][mine].split(MICRO), targets[step][mine].split(MICRO), strict=True))


def _build(world_size: int, global_batch_size: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Accumulator]:
    inner = make_model()
    model = nn.parallel.DistributedDataParallel(inner) if world_size > 1 else inner
    optimizer = make_optimizer("adam", model.parameters())
    plan = BatchPlan(global_batch_size=global_batch_size, micro_batch_size=MICRO)
    return inner, model, optimizer, Accumulator(model, optimizer, plan)


def _train(
    rank: int,
    world_size: int,
    model: nn.Module,
    acc: Accumulator,
    start: tuple[int, int] = (0, 0),
    on_micro_step: Any = None,
) -> None:
    """Train from data position ``start`` = (optimizer step, micro-batch in window) to the end of STEPS."""
    first_step, first_index = start
    for step in range(first_step, STEPS):
        batches = rank_slice(step, rank, world_size, acc.plan.global_batch_size)
        for index in range(first_index if step == first_step else 0, len(batches)):
            x, y = batches[index]
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
            if on_micro_step is not None:
                on_micro_step(step, index + 1)


# ------------------------------------------------------------------------------------ exact resume mid-window
def save_at_every_micro_step(rank: int, world_size: int) -> dict[str, Any]:
    """An uninterrupted run that snapshots its full state after every micro-step (what a checkpoint would hold)."""
    inner, model, optimizer, acc = _build(world_size, MICRO * ACCUM * world_size)
    snapshots: list[dict[str, Any]] = []

    def snapshot(step: int, done_in_window: int) -> None:
        position = (step + 1, 0) if done_in_window == ACCUM else (step, done_in_window)
        snapshots.append(
            {
                "model": _clone(inner.state_dict()),
                # optimizer.state_dict() references the live tensors that the next steps change in place
                "optimizer": torch.load(_roundtrip(optimizer.state_dict()), weights_only=False),
                "accumulator": acc.state_dict(include_grads=True),
                "position": position,
            }
        )

    _train(rank, world_size, model, acc, on_micro_step=snapshot)
    return {"final": _clone(inner.state_dict()), "snapshots": snapshots}


def _roundtrip(value: Any) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def resume_from_snapshots(rank: int, world_size: int, per_rank_snapshots: list[list[dict[str, Any]]]) -> dict:
    """Resume in fresh processes from each snapshot of this rank; also once without the saved gradients."""
    finals = []
    per_rank_snapshots = torch.load(_roundtrip(per_rank_snapshots), weights_only=False)  # see elastic_run
    for snapshot in per_rank_snapshots[rank]:
        inner, model, optimizer, acc = _build(world_size, MICRO * ACCUM * world_size)
        inner.load_state_dict(snapshot["model"])
        optimizer.load_state_dict(snapshot["optimizer"])
        acc.load_state_dict(snapshot["accumulator"])
        _train(rank, world_size, model, acc, start=snapshot["position"])
        finals.append(_clone(inner.state_dict()))
    # The same mid-window resume without the gradients: shows the test above can fail.
    snapshot = per_rank_snapshots[rank][1]
    inner, model, optimizer, acc = _build(world_size, MICRO * ACCUM * world_size)
    inner.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    state = {key: value for key, value in snapshot["accumulator"].items() if key != "grads"}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.load_state_dict(state)
    _train(rank, world_size, model, acc, start=snapshot["position"])
    return {"finals": finals, "without_grads": _clone(inner.state_dict()), "warnings": [str(w.message) for w in caught]}


# ----------------------------------------------------------------------------------- the checkpoint helper
def wrap(backend: str, model: nn.Module, world_size: int) -> nn.Module:
    if backend == "plain":
        return model
    if backend == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return _clone(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))


def train_with_checkpoint(
    rank: int, world_size: int, backend: str, directory: str, save_at: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """Train to the end through distaccum.checkpoint: saving at data position ``save_at``, or (None) resuming
    from the newest checkpoint in ``directory`` with the plan it gives for this world size."""
    from distaccum import checkpoint

    plan = checkpoint.resume_plan(directory) if save_at is None else None
    plan = plan or BatchPlan(global_batch_size=MICRO * ACCUM * 2, micro_batch_size=MICRO)
    model = wrap(backend, make_model(), world_size)
    optimizer = make_optimizer("adam", model.parameters())
    acc = Accumulator(model, optimizer, plan)
    objects = {"model": model, "optimizer": optimizer, "accumulator": acc}
    start = (0, 0)
    if save_at is None:
        data = checkpoint.load(directory, **objects)
        assert data is not None
        start = (data["step"], data["micro_batch"])

    def maybe_save(step: int, done_in_window: int) -> None:
        position = (step + 1, 0) if done_in_window == acc.plan.accum_steps else (step, done_in_window)
        if position == save_at:
            data_state = {"step": position[0], "micro_batch": position[1]}
            checkpoint.save(directory, **objects, data_state=data_state, include_grads=True)

    _train(rank, world_size, model, acc, start=start, on_micro_step=maybe_save)
    return full_state(model)


def roundtrip_checkpoints(rank: int, world_size: int, directory: str) -> dict[str, dict[str, Any]]:
    """DDP saved mid-window and FSDP2 saved at a boundary: uninterrupted run, then fresh objects resumed."""
    results = {}
    for backend, save_at in (("ddp", (1, 2)), ("fsdp2", (1, 0))):
        target = f"{directory}/{backend}"
        uninterrupted = train_with_checkpoint(rank, world_size, backend, target, save_at)
        resumed = train_with_checkpoint(rank, world_size, backend, target, None)
        results[backend] = {"uninterrupted": uninterrupted, "resumed": resumed}
    return results


# ---------------------------------------------------------------------------------------- elastic world size
def elastic_run(rank: int, world_size: int, foreign_boundary_state: dict[str, Any], boundary_step: int) -> dict:
    """(a) uninterrupted run on this world size, keeping its state at ``boundary_step``; (b) a resume of a
    boundary state saved by a job of another world size, trained to the end here."""
    global_batch_size = MICRO * ACCUM * 2
    inner, model, optimizer, acc = _build(world_size, global_batch_size)
    kept: dict[str, Any] = {}

    def keep(step: int, done_in_window: int) -> None:
        if acc.stepped and acc.optimizer_steps == boundary_step:
            kept.update(
                model=_clone(inner.state_dict()),
                optimizer=torch.load(_roundtrip(optimizer.state_dict()), weights_only=False),
                accumulator=acc.state_dict(include_grads=True),
            )

    _train(rank, world_size, model, acc, on_micro_step=keep)
    uninterrupted = _clone(inner.state_dict())
    # Arguments arrive in shared memory, the same tensors on both ranks, and optimizer.load_state_dict keeps the
    # tensors it is given: without a private copy both ranks' Adam would update one shared state twice per step.
    foreign_boundary_state = torch.load(_roundtrip(foreign_boundary_state), weights_only=False)
    inner, model, optimizer, acc = _build(world_size, global_batch_size)
    inner.load_state_dict(foreign_boundary_state["model"])
    optimizer.load_state_dict(foreign_boundary_state["optimizer"])
    acc.load_state_dict(foreign_boundary_state["accumulator"])
    resumed_accum_steps = acc.plan.accum_steps
    _train(rank, world_size, model, acc, start=(boundary_step, 0))
    return {
        "uninterrupted": uninterrupted,
        "boundary_state": kept,
        "resumed": _clone(inner.state_dict()),
        "resumed_accum_steps": resumed_accum_steps,
        "steps": acc.optimizer_steps,
    }


# ------------------------------------------------------------------------------------------------- non-finite
def nan_on_one_rank(rank: int, world_size: int) -> dict:
    """Window 2's first micro-batch is NaN on rank 1 only: skip mode, then raise mode on a second model."""
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    inputs, targets = make_data(2 * STEPS, MICRO)
    results: dict[str, Any] = {}
    for mode in ("skip", "raise"):
        model = nn.parallel.DistributedDataParallel(make_model())
        acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan, on_nonfinite=mode)
        after_step = []
        try:
            for index in range(2 * STEPS):
                with acc.micro_step():
                    loss = loss_fn(model(inputs[index]), targets[index])
                    if rank == 1 and index == 2:
                        loss = loss * float("nan")
                    acc.backward(loss)
                if acc.stepped:
                    after_step.append((acc.last_step, _clone(model.module.state_dict())))
            results[mode] = {"after_step": after_step, "skipped_steps": acc.skipped_steps}
        except FloatingPointError as error:
            results[mode] = {"error": str(error), "steps": (acc.optimizer_steps, acc.skipped_steps)}
    return results


class TwoBranches(nn.Module):
    """``a(x) + b(x)``: one FSDP1 flat parameter whose first half (``a``) is rank 0's shard and second half
    (``b``) rank 1's, so a loss term on ``b`` alone overflows one rank's shard only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.b(x)
        return self.a(x) + branch, branch


def overflow_on_one_fsdp1_shard(rank: int, world_size: int) -> dict:
    """FSDP1 + torch.amp.GradScaler; window 2's gradient is inf in rank 1's shard only."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(TwoBranches(), device_id=torch.device("cpu"), use_orig_params=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan, grad_scaler=scaler)
    inputs, targets = make_data(2 * STEPS, MICRO)
    report: dict[str, Any] = {"skipped": [], "scale": [], "local_weights": []}
    for index in range(2 * STEPS):
        with acc.micro_step():
            out, branch = model(inputs[index])
            loss = loss_fn(out, targets[index])
            if rank == 1 and index == 2:
                loss = loss + float("inf") * branch.sum()  # reaches b's gradient only
            acc.backward(loss)
        if acc.stepped:
            report["skipped"].append(acc.last_step.skipped)
            report["scale"].append(scaler.get_scale())
            report["local_weights"].append([p.detach().clone() for p in model.parameters()])
    return report


def exception_on_one_rank(rank: int, world_size: int, fail_index: int) -> dict:
    """Rank 1's block raises after its backward at micro-step ``fail_index`` of window 2; the loop catches it."""
    model = nn.parallel.DistributedDataParallel(make_model())
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    )
    inputs, targets = make_data(2 * STEPS, MICRO)
    skipped = []
    for index in range(2 * STEPS):
        try:
            with acc.micro_step():
                acc.backward(loss_fn(model(inputs[index]), targets[index]))
                if rank == 1 and index == 2 + fail_index:
                    raise KeyError("a user error after the backward")
        except KeyError:
            pass
        if acc.stepped:
            skipped.append(acc.last_step.skipped)
    return {"skipped": skipped, "weights": _clone(model.module.state_dict())}


# ------------------------------------------------------------------------------------------------ uneven data
def uneven_data(rank: int, world_size: int, counts: tuple[int, int]) -> dict:
    """Rank r has ``counts[r]`` micro-batches, fed through a generator (no len) and ``acc.iterate``; both modes."""
    inputs, targets = make_data(max(counts), MICRO, seed=10 + rank)
    results = {}
    for drop_last in (False, True):
        model = nn.parallel.DistributedDataParallel(make_model())
        plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
        acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan)
        read = []

        def loader(read: list[int] = read):
            for index in range(counts[rank]):
                read.append(index)
                yield inputs[index], targets[index]

        steps = []
        for x, y in acc.iterate(loader(), drop_last=drop_last):
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y))
            if acc.stepped:
                steps.append(acc.last_step.micro_steps)
        results[drop_last] = {
            "state": _clone(model.module.state_dict()),
            "micro_steps_per_step": steps,
            "dropped": acc.dropped_micro_batches,
            "read": len(read),
        }
    return results


# ------------------------------------------------------------------------------------------- disagreements
def disagreements(rank: int, world_size: int) -> list[str]:
    """Two ways ranks can drift apart, each caught on every rank; returns the messages in order."""
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    inputs, targets = make_data(4, MICRO)
    messages = []

    def fresh(check_ranks: bool = True) -> tuple[nn.Module, Accumulator]:
        model = nn.parallel.DistributedDataParallel(make_model())
        return model, Accumulator(model, make_optimizer("sgd", model.parameters()), plan, check_ranks=check_ranks)

    # 1. rank 1 resumed from another checkpoint: one micro-step further into the window.
    model, acc = fresh()
    state = acc.state_dict()
    if rank == 1:
        state.update(micro_step=1, grads=[torch.zeros_like(p) for p in model.parameters()])
    acc.load_state_dict(state)
    # 2. start-up check turned off and rank 1 at another optimizer step: caught at the first boundary.
    model2, acc2 = fresh(check_ranks=False)
    if rank == 1:
        acc2.load_state_dict({**acc2.state_dict(), "optimizer_steps": 7})
    cases = (
        (model, acc, lambda loss: acc.backward(loss)),
        (model2, acc2, lambda loss: acc2.backward(loss)),
    )
    for case_model, case_acc, backward in cases:
        try:
            for index in range(2):
                with case_acc.micro_step():
                    backward(loss_fn(case_model(inputs[index]), targets[index]))
            messages.append("no error")
        except RuntimeError as error:
            messages.append(str(error))
    return messages


# ----------------------------------------------------------------------------- a rank that dies or stalls
def _misbehaving_rank(case: str) -> None:
    rank = dist.rank()
    model = nn.parallel.DistributedDataParallel(make_model())
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=2)
    )
    inputs, targets = make_data(4 * FAULT_AT, MICRO)
    last_progress = time.monotonic()
    try:
        for index in range(4 * FAULT_AT):
            if rank == 1 and index == FAULT_AT:
                if case == "stall":
                    time.sleep(600)  # the test kills it long before
                elif case == "exit":
                    os._exit(3)
                elif case == "flush":  # a hand-written loop whose data ended early on this rank
                    acc.flush()
                    time.sleep(600)
            with acc.micro_step():
                acc.backward(loss_fn(model(inputs[index]), targets[index]))
            last_progress = time.monotonic()
    except Exception as error:
        report = {"rank": rank, "seconds_waited": time.monotonic() - last_progress, "error": str(error)[:400]}
        print(json.dumps(report), flush=True)
        raise


if __name__ == "__main__":
    dist.init(timeout_s=float(sys.argv[2]))
    dist.run(_misbehaving_rank, sys.argv[1])
