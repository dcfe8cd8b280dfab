"""The bench harness's sharded methods (FSDP2, HSDP, ZeRO 2 and 3) make the reference's update and count the
gradient reductions each ``grad_sync`` mode should make, micro-step by micro-step (never how fast)."""

from __future__ import annotations

import json

import pytest

from examples.bench import harness
from examples.bench.harness import BenchConfig
from examples.bench.harness.config import available_methods
from examples.bench.harness.methods import METHODS

ACCUM_STEPS = 3
UNITS = 3  # the tiny MLP's Linear layers, one FSDP unit each (the root holds no parameter of its own)
SHARDED = ("fsdp2_boundary", "fsdp2_sharded", "fsdp2_every")
ZERO = ("deepspeed_zero2", "distaccum_zero2", "deepspeed_zero3", "distaccum_zero3")
pytestmark = pytest.mark.timeout(180)  # two real runs, 2 and 4 ranks: ~15 s and ~20 s on 2 idle cores


def _run(tmp_path_factory: pytest.TempPathFactory, nproc: int, methods: tuple[str, ...]) -> dict:
    out = tmp_path_factory.mktemp(f"sharded{nproc}")
    argv = [
        "--nproc", str(nproc), "--size", "tiny", "--models", "mlp", "--accum-steps", str(ACCUM_STEPS),
        "--methods", "no_sync", *methods, "--warmup", "1", "--rounds", "1", "--no-memory", "--memory-sweep",
        "--timeout", "150", "--json", str(out / "bench.json"), "--table", str(out / "bench.txt"),
    ]  # fmt: skip
    assert harness.main(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    ((case,),) = (results["cases"],)
    return {**case["methods"], "_table": (out / "bench.txt").read_text()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real 2-rank run of the FSDP2 and ZeRO 2/3 methods through the command line (tiny MLP, k=3)."""
    return _run(tmp_path_factory, 2, SHARDED + ZERO)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real 4-rank run of the HSDP methods (2 replicas x 2 shards)."""
    return _run(tmp_path_factory, 4, ("hsdp_boundary", "hsdp_sharded"))


def test_sharded_methods_make_the_reference_update(two_ranks, four_ranks):
    # Their weights are read gathered (full_tensor, GatheredParameters): a shard would not even have the same length.
    for name in (*SHARDED, *ZERO, "hsdp_boundary", "hsdp_sharded"):
        entry = two_ranks.get(name) or four_ranks[name]
        assert entry["update_reference"] == "no_sync", name
        assert entry["update_mismatch_vs_reference"] < 1e-4, (name, entry["update_mismatch_vs_reference"])
        assert entry["replicas_agree"], name


def test_fsdp2_boundary_reduce_scatters_in_the_boundary_micro_step_only(two_ranks):
    entry = two_ranks["fsdp2_boundary"]
    assert entry["gradient_reductions_by_micro_step"] == [0] * (ACCUM_STEPS - 1) + [UNITS]
    assert (entry["reduce_scatters_per_step"], entry["gradient_all_reduces_per_step"]) == (UNITS, 0)
    assert entry["all_gathers_per_step"] > 0  # FSDP2's parameter all-gathers: other collectives, not reductions


@pytest.mark.parametrize("name", ["fsdp2_sharded", "fsdp2_every"])
def test_fsdp2_sharded_and_every_reduce_scatter_in_every_micro_step(two_ranks, name):
    entry = two_ranks[name]
    assert entry["gradient_reductions_by_micro_step"] == [UNITS] * ACCUM_STEPS
    assert (entry["reduce_scatters_per_step"], entry["gradient_all_reduces_per_step"]) == (UNITS * ACCUM_STEPS, 0)


def test_zero_2_and_3_reduce_in_every_micro_step(two_ranks):
    # On CPU/gloo ZeRO 2 all-reduces its bucket and keeps its partition; ZeRO 3 reduce-scatters it. One bucket here.
    for name in ZERO:
        assert two_ranks[name]["gradient_reductions_by_micro_step"] == [1] * ACCUM_STEPS, name
    for name in ("deepspeed_zero2", "distaccum_zero2"):
        assert (two_ranks[name]["reduce_scatters_per_step"], two_ranks[name]["gradient_all_reduces_per_step"]) == (0, 3)
    for name in ("deepspeed_zero3", "distaccum_zero3"):
        assert (two_ranks[name]["reduce_scatters_per_step"], two_ranks[name]["gradient_all_reduces_per_step"]) == (3, 0)


def test_hsdp_all_reduces_across_replicas_at_the_boundary_only(four_ranks):
    boundary, sharded = four_ranks["hsdp_boundary"], four_ranks["hsdp_sharded"]
    # Boundary: reduce-scatter + replica all-reduce per unit, all in the last micro-step.
    assert boundary["gradient_reductions_by_micro_step"] == [0] * (ACCUM_STEPS - 1) + [2 * UNITS]
    assert (boundary["reduce_scatters_per_step"], boundary["gradient_all_reduces_per_step"]) == (UNITS, UNITS)
    # Sharded: a reduce-scatter per unit in every micro-step, the replica all-reduce at the boundary only.
    assert sharded["gradient_reductions_by_micro_step"] == [UNITS] * (ACCUM_STEPS - 1) + [2 * UNITS]
    assert (sharded["reduce_scatters_per_step"], sharded["gradient_all_reduces_per_step"]) == (
        UNITS * ACCUM_STEPS,
        UNITS,
    )


def test_the_table_shows_reduce_scatters_and_all_reduces(two_ranks):
    table = two_ranks["_table"]
    assert "RS/AR" in table
    line = next(line for line in table.splitlines() if line.startswith(METHODS["fsdp2_sharded"].letter.join("()")))
    assert f" {UNITS * ACCUM_STEPS}/0 " in line


def test_sharded_methods_are_opt_in():
    default = available_methods()
    assert not [name for name in default if METHODS[name].opt_in]
    assert {*SHARDED, *ZERO, "hsdp_boundary", "hsdp_sharded"} <= {n for n, m in METHODS.items() if m.opt_in}
    assert BenchConfig().methods == default


def test_hsdp_is_refused_off_four_ranks():
    with pytest.raises(ValueError, match=r"hsdp_sharded run FSDP2 on a 2 x 2 .* needs 4 ranks, but nproc is 2"):
        BenchConfig(nproc=2, methods=("no_sync", "hsdp_sharded"))
