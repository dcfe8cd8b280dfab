"""The combinatorial harness on one process: sampled configurations of the whole option space, the regression cases
it found, and a mutation that shows it can fail (:mod:`tests.helpers.combinations`).

``DISTACCUM_COMBOS`` sets how many configurations are sampled (CI: 1,000), ``DISTACCUM_COMBO_SEED`` which ones;
``bash launch/soak_combinations.sh`` runs thousands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import combination_workers as workers
from tests.helpers import combinations as combos

COUNT = int(os.environ.get("DISTACCUM_COMBOS", "1000"))
SEED = int(os.environ.get("DISTACCUM_COMBO_SEED", "0"))
MUTATED = 150  # exact configurations that must all fail once one micro-batch's loss is scaled by 1.001

REGRESSIONS = [(name, config) for name, config, world_size in combos.REGRESSIONS if world_size == 1]
KNOWN = {known.name: known for known in combos.KNOWN_FAILING if known.world_size == 1}


def run(config: combos.Config, tmp_path, mutate: bool = False) -> combos.Verdict:
    directory = tmp_path / f"checkpoint-{abs(hash(config))}-{int(mutate)}"
    return combos.judge(config, 1, [workers.run_config(config, 0, 1, str(directory), mutate)])


def test_the_reference_does_not_import_distaccum() -> None:
    code = (
        "import sys; import tests.helpers.combinations as c; c.reference(c.Config(items=True, nan=True), 2); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'distaccum'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def test_the_sampler_is_seeded_and_reaches_every_option() -> None:
    configs = combos.sample(600, SEED, 2)
    assert configs == combos.sample(600, SEED, 2)
    assert configs != combos.sample(600, SEED + 1, 2)
    options = {
        "backend": combos.BACKENDS[2],
        "dtype": combos.DTYPES,
        "optimizer": combos.OPTIMIZERS,
        "impl": combos.IMPLS,
        "unused": combos.UNUSED,
        "end": combos.ENDS,
        "grad_sync": combos.GRAD_SYNCS,
        "accumulate_dtype": combos.ACCUMULATE_DTYPES,
        "scheduler": combos.SCHEDULERS,
        "checkpoint": combos.CHECKPOINTS,
        "frozen": combos.FROZEN,
    }
    for field, values in options.items():
        assert {getattr(config, field) for config in configs} == set(values), field
    for flag in ("items", "empty_micro_batch", "nan", "uneven", "batch_schedule", "noise_scale", "groups"):
        assert {getattr(config, flag) for config in configs} == {True, False}, flag


def test_the_sampler_leaves_out_what_torch_breaks_and_what_is_known_to_fail() -> None:
    for config in combos.sample(2000, SEED, 2):
        assert combos.known_failure(config, 2) is None, config
        assert not (config.backend == "fsdp2" and config.impl == "fused" and config.optimizer in ("sgd", "momentum"))
        assert not (config.impl == "fused" and config.optimizer == "momentum" and config.unused != "none")
        assert not (config.backend == "fsdp1" and config.unused == "window" and config.optimizer != "sgd")


@pytest.mark.timeout(60 + COUNT // 10)
def test_sampled_configurations_equal_the_real_batch_or_are_refused_at_construction(tmp_path) -> None:
    configs = combos.sample(COUNT, SEED, 1)
    records = [
        [workers.run_config(config, 0, 1, str(tmp_path / f"checkpoint-{n}"))] for n, config in enumerate(configs)
    ]
    found = combos.failures(configs, 1, records)
    assert not found, f"{len(found)} of {COUNT} configurations failed:\n" + "\n".join(found)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "config"),
    [
        pytest.param(
            name,
            config,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN[name].row)] if name in KNOWN else [],
            id=name,
        )
        for name, config in REGRESSIONS
    ],
)
def test_regression_case(name: str, config: combos.Config, tmp_path) -> None:
    verdict = run(config, tmp_path)
    assert verdict.ok, f"{verdict.kind}: {verdict.detail}"


@pytest.mark.timeout(120)
def test_a_loss_scaled_by_1_001_on_one_micro_batch_fails_every_exact_case(tmp_path) -> None:
    sampled = combos.sample(4 * MUTATED, SEED + 7, 1)
    exact = [config for config in sampled if config.exact and combos.script(config, 1).mutation is not None]
    checked = 0
    for config in exact[:MUTATED]:
        if run(config, tmp_path).kind != "equal":
            continue  # refused: nothing trained
        mutated = run(config, tmp_path, mutate=True)
        assert not mutated.ok, f"the harness missed a 1.001 loss scale: {config.describe()}"
        checked += 1
    assert checked >= MUTATED // 2


def test_the_mutation_lands_in_a_window_that_steps() -> None:
    for config in combos.sample(500, SEED, 2):
        the_script = combos.script(config, 2)
        if the_script.mutation is None or the_script.nan is None:
            continue
        windows = [{(r, i) for r, micro in enumerate(w.micro) for i in micro} for w in the_script.windows]
        assert not any(the_script.mutation in window and the_script.nan in window for window in windows), config


def test_the_soak_script_runs_the_sampled_tests_with_its_knobs() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DRY_RUN": "1", "DISTACCUM_COMBOS": "2500", "DISTACCUM_COMBO_SEED": "9"}
    done = subprocess.run(
        ["bash", str(root / "launch" / "soak_combinations.sh"), "-x"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "DISTACCUM_COMBOS=2500 DISTACCUM_COMBO_SEED=9" in done.stdout
    for path in ("tests/unit/test_combinations.py::", "tests/distributed/test_combinations.py::"):
        assert path + "test_sampled_configurations" in done.stdout
    assert done.stdout.rstrip().endswith("-x")
