"""The combinatorial harness on 2 gloo ranks: DDP, FSDP1 and FSDP2 across dtypes, optimizers and options, each
configuration against one process on the real batch (:mod:`tests.helpers.combinations`). All configurations of a
test run in one spawn (start-up costs more than a configuration), each in a process group of its own.

``DISTACCUM_COMBOS`` sets how many configurations are sampled (CI: 300), ``DISTACCUM_COMBO_SEED`` which ones;
``bash launch/soak_combinations.sh`` runs thousands.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import combination_workers as workers
from tests.helpers import combinations as combos

WORLD_SIZE = 2
COUNT = int(os.environ.get("DISTACCUM_COMBOS", "300"))
SEED = int(os.environ.get("DISTACCUM_COMBO_SEED", "0"))
MUTATED = 40
REGRESSION_TIMEOUT_S = 10.0  # a known hang among the regression cases costs this, not the default 30 s

REGRESSIONS = [(name, config) for name, config, world_size in combos.REGRESSIONS if world_size == WORLD_SIZE]
KNOWN = {known.name: known for known in combos.KNOWN_FAILING if known.world_size == WORLD_SIZE}


@pytest.fixture(scope="module")
def regression_verdicts(tmp_path_factory) -> dict[str, combos.Verdict]:
    configs = [config for _, config in REGRESSIONS]
    workdir = tmp_path_factory.mktemp("combination-regressions")
    records = workers.run_batches(configs, str(workdir), world_size=WORLD_SIZE, timeout_s=REGRESSION_TIMEOUT_S)
    return {
        name: combos.judge(config, WORLD_SIZE, ranks)
        for (name, config), ranks in zip(REGRESSIONS, records, strict=True)
    }


@pytest.mark.timeout(120 + COUNT // 2)
def test_sampled_configurations_equal_the_real_batch_or_are_refused_at_construction(tmp_path) -> None:
    configs = combos.sample(COUNT, SEED, WORLD_SIZE)
    records = workers.run_batches(configs, str(tmp_path), world_size=WORLD_SIZE)
    found = combos.failures(configs, WORLD_SIZE, records)
    assert not found, f"{len(found)} of {COUNT} configurations failed:\n" + "\n".join(found)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[name].row)] if name in KNOWN else [], id=name
        )
        for name, _ in REGRESSIONS
    ],
)
def test_regression_case(name: str, regression_verdicts: dict[str, combos.Verdict]) -> None:
    verdict = regression_verdicts[name]
    assert verdict.ok, f"{verdict.kind}: {verdict.detail}"


@pytest.mark.timeout(180)
def test_a_loss_scaled_by_1_001_on_one_micro_batch_fails_every_exact_case(tmp_path) -> None:
    sampled = combos.sample(4 * MUTATED, SEED + 7, WORLD_SIZE)
    configs = [c for c in sampled if c.exact and combos.script(c, WORLD_SIZE).mutation is not None][:MUTATED]
    honest = workers.run_batches(configs, str(tmp_path / "honest"), world_size=WORLD_SIZE)
    mutated = workers.run_batches(configs, str(tmp_path / "mutated"), world_size=WORLD_SIZE, mutate=True)
    checked = 0
    for config, plain, scaled in zip(configs, honest, mutated, strict=True):
        if combos.judge(config, WORLD_SIZE, plain).kind != "equal":
            continue  # refused: nothing trained
        verdict = combos.judge(config, WORLD_SIZE, scaled)
        assert not verdict.ok, f"the harness missed a 1.001 loss scale: {config.describe()}"
        checked += 1
    assert checked >= MUTATED // 2
