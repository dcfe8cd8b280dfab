"""The bench harness (``python -m examples.bench.harness``) works end to end in a tiny configuration and counts
reductions right (never how fast)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from examples.bench import harness
from examples.bench.harness import BenchConfig
from examples.bench.harness.counting import CommCounter, counting_collectives
from examples.bench.harness.launch import launch
from examples.bench.harness.methods import METHODS
from examples.bench.harness.records import Case, Job
from examples.bench.harness.report import format_report

ACCUM_STEPS = 3
DDP_METHODS = ("no_sync", "distaccum", "distaccum_items", "accelerate", "real_batch")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real 2-rank run of every method through the command line (tiny MLP, k=3), read back from --json."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--size", "tiny", "--models", "mlp", "--accum-steps", str(ACCUM_STEPS), "--warmup", "1",
        "--rounds", "2", "--no-memory", "--memory-sweep", "2", "--memory-steps", "1", "--timeout", "240",
        "--json", str(out / "bench.json"), "--table", str(out / "bench.txt"),
    ]  # fmt: skip
    assert harness.main(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    results["_table"] = (out / "bench.txt").read_text()
    return results


def _methods(results: dict) -> dict:
    (case,) = results["cases"]
    assert case["accum_steps"] == ACCUM_STEPS
    return case["methods"]


def test_every_method_is_timed_on_every_round(tiny_run):
    methods = _methods(tiny_run)
    assert list(methods) == [name for name, method in METHODS.items() if not method.opt_in]  # the default set
    for entry in methods.values():
        assert len(entry["seconds_per_step"]) == 2
        assert all(seconds > 0 for seconds in entry["seconds_per_step"])
        assert entry["p25_s"] <= entry["median_s"] <= entry["p75_s"]
    assert methods["no_sync"]["time_vs_no_sync"] == 1.0


def test_sync_every_micro_batch_reduces_k_times_per_bucket(tiny_run):
    methods = _methods(tiny_run)
    buckets = methods["no_sync"]["gradient_reductions_per_step"]
    assert buckets == 1  # the tiny model fits DDP's first bucket
    assert methods["sync_every"]["gradient_reductions_per_step"] == ACCUM_STEPS * buckets


def test_accumulating_methods_reduce_once_per_bucket(tiny_run):
    methods = _methods(tiny_run)
    for name in DDP_METHODS:
        assert methods[name]["gradient_reductions_per_step"] == 1, name
    # DeepSpeed ZeRO 0 all-reduces one flat buffer at the boundary, counted at the torch.distributed call.
    assert methods["deepspeed"]["gradient_reductions_per_step"] == 1
    assert methods["distaccum_deepspeed"]["gradient_reductions_per_step"] == 1


def test_distaccum_adds_one_scalar_all_reduce_per_step_and_the_baselines_none(tiny_run):
    methods = _methods(tiny_run)
    for name in ("distaccum", "distaccum_items", "distaccum_deepspeed"):
        assert methods[name]["other_collectives_per_step"] == 1, name
    for name in ("sync_every", "no_sync", "accelerate", "deepspeed", "real_batch"):
        assert methods[name]["other_collectives_per_step"] == 0, name


def test_all_methods_make_the_same_update_on_equal_micro_batches(tiny_run):
    # Equal-size micro-batches: every method is the same mathematics, so a method that did not average across
    # ranks (Accelerate without ACCELERATE_USE_CPU) or scaled twice (DeepSpeed) would stand out here. The clipping
    # methods (i) and (j) make another update than (b): they are checked against (i).
    for name, entry in _methods(tiny_run).items():
        assert entry["update_reference"] == METHODS[name].reference, name
        assert entry["update_mismatch_vs_reference"] < 1e-4, (name, entry["update_mismatch_vs_reference"])
        assert entry["replicas_agree"], name


def test_memory_sweep_and_report(tiny_run):
    (row,) = tiny_run["memory_sweep"]
    assert row["accum_steps"] == 2
    assert row["virtual_peak_mib"] > 50 and row["real_peak_mib"] > 50  # a process with torch imported
    assert row["real_vs_real_micro"] == 1.0
    assert "python -m examples.bench.harness --nproc 2 --models mlp --accum-steps 3" in tiny_run["command"]
    table = tiny_run["_table"]
    assert table.startswith("$ python -m examples.bench.harness --nproc 2")
    for entry in _methods(tiny_run).values():
        assert entry["label"] in table
    assert format_report({k: v for k, v in tiny_run.items() if k != "_table"}) in table


def test_counting_collectives_splits_gradient_buffers_from_scalars(tmp_path):
    counter = CommCounter()
    gradient_phase = [False]
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    with counting_collectives(counter, gradient_buffers=lambda: gradient_phase[0]):
        torch_dist.all_reduce(torch.zeros(4096))
        gradient_phase[0] = True
        torch_dist.all_reduce(torch.zeros(4096))
        torch_dist.all_reduce(torch.zeros(3))
    torch_dist.all_reduce(torch.zeros(4096))  # after the context: not counted
    assert (counter.gradient_reductions, counter.other_collectives) == (1, 2)
    assert counter.calls == {"all_reduce": 3}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rounds", 0, "rounds must be positive, got 0"),
        ("accum_steps", (0,), "accum_steps and memory_sweep need values >= 1"),
        ("methods", ("no_sync", "horovod"), "unknown method"),
        ("models", ("resnet",), "not a benchmark model"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**{field: value})


def _memory_job(method: str) -> Job:
    cases = [Case("mlp", 2, 1)]
    return Job("memory", cases, [method], size="tiny", seed=0, threads=1, warmup=0, rounds=1, steps=1)


def test_a_failing_rank_fails_the_job_with_its_log():
    job = _memory_job("x")
    with tempfile.TemporaryDirectory() as workdir, pytest.raises(RuntimeError, match="KeyError: 'x'"):
        launch(job, 2, 120.0, Path(workdir))


def test_a_hanging_job_is_killed_and_reported():
    job = _memory_job("distaccum")
    with tempfile.TemporaryDirectory() as workdir, pytest.raises(TimeoutError, match="did not finish in 0 s"):
        launch(job, 2, 0.2, Path(workdir))
