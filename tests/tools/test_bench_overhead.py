"""The bench harness's ``--overhead`` runs end to end in a tiny configuration, and its arithmetic (never how fast)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from examples.bench import harness
from examples.bench.harness import BenchConfig
from examples.bench.harness import cli as bench_cli
from examples.bench.harness.overhead import (
    BASELINES,
    VARIANTS,
    OverheadConfig,
    own_cost,
    per_round_figures,
    summarize,
)

ROUNDS = 2
STATS = {"median", "p25", "p75", "iqr"}
FIGURES = {"cpu_us", "wall_us", "cpu_us_non_boundary", "wall_us_non_boundary", "cpu_us_boundary", "wall_us_boundary"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real run through the command line at accum_steps 1 and 4, read back from --json and --table."""
    out = tmp_path_factory.mktemp("overhead")
    argv = [
        "--overhead", "--accum-steps", "1", "4", "--rounds", str(ROUNDS), "--micro-steps", "18",
        "--warmup", "1", "--json", str(out / "overhead.json"), "--table", str(out / "overhead.txt"),
    ]  # fmt: skip
    assert harness.main(argv) == 0
    results = json.loads((out / "overhead.json").read_text())
    results["_table"] = (out / "overhead.txt").read_text()
    return results


def _is_stats(value: object) -> bool:
    return isinstance(value, dict) and set(value) == STATS and all(isinstance(v, float) for v in value.values())


def test_json_holds_every_figure_with_its_type(tiny_run):
    assert tiny_run["kind"] == "overhead"
    expected = "python -m examples.bench.harness --overhead --accum-steps 1 4 --rounds 2 --micro-steps 18 --warmup 1"
    assert tiny_run["command"] == expected
    assert tiny_run["config"]["rounds"] == ROUNDS and tiny_run["config"]["model"] == "nn.Linear(4, 4)"
    assert tiny_run["environment"]["threads"] == 1 and isinstance(tiny_run["environment"]["wall_s"], float)
    assert tiny_run["variants"] == VARIANTS and tiny_run["baselines"] == BASELINES
    assert [case["accum_steps"] for case in tiny_run["cases"]] == [1, 4]
    for case in tiny_run["cases"]:
        assert set(case["variants"]) == set(VARIANTS)
        for entry in case["variants"].values():
            assert all(
                len(values) == ROUNDS and all(isinstance(v, int) for v in values) for values in entry["rounds"].values()
            )
            assert all(_is_stats(entry[key]) or entry[key] is None for key in FIGURES)
            assert entry["cpu_us"]["median"] > 0 and isinstance(entry["gc_objects_per_micro_step"], float)
        assert set(case["own_cost"]) == set(BASELINES) == set(case["max_abs_diff"])
        assert all(set(own) == FIGURES for own in case["own_cost"].values())


def test_micro_steps_round_down_to_whole_windows_and_split_at_the_boundary(tiny_run):
    one, four = tiny_run["cases"]
    assert (one["micro_steps"], one["boundaries"]) == (18, 18)
    assert (four["micro_steps"], four["boundaries"]) == (16, 4)
    # accum_steps 1 has no non-boundary micro-step; at 4 both kinds are timed.
    assert (
        one["variants"]["hand"]["cpu_us_non_boundary"] is None
        and one["own_cost"]["distaccum"]["wall_us_non_boundary"] is None
    )
    assert _is_stats(four["variants"]["hand"]["cpu_us_non_boundary"]) and _is_stats(
        four["own_cost"]["distaccum"]["cpu_us_boundary"]
    )


def test_sanity_check_passes_distaccum_matches_the_hand_loop(tiny_run):
    sanity = tiny_run["sanity"]
    assert sanity["passed"] is True and sanity["tolerance"] == 1e-6
    assert 0 <= sanity["max_abs_diff"] <= 1e-6
    assert all(diff <= 1e-6 for case in tiny_run["cases"] for diff in case["max_abs_diff"].values())
    assert "every pair within it: ok" in tiny_run["_table"]


def test_table_names_the_command_rounds_and_micro_steps(tiny_run):
    table = tiny_run["_table"]
    assert table.startswith(f"$ {tiny_run['command']}\n")
    assert f"{ROUNDS} timed rounds after 1 warm-up" in table
    assert "### accum_steps 4: 16 micro-steps, 4 optimizer steps per variant and round" in table
    assert "| distaccum, num_items | hand_items |" in table


def test_summarize_gives_linear_quartiles():
    assert summarize([5.0, 1.0, 4.0, 2.0, 3.0]) == {"median": 3.0, "p25": 2.0, "p75": 4.0, "iqr": 2.0}
    assert summarize([1.0, 2.0, 3.0, 4.0]) == {"median": 2.5, "p25": 1.75, "p75": 3.25, "iqr": 1.5}
    assert summarize([7.0]) == {"median": 7.0, "p25": 7.0, "p75": 7.0, "iqr": 0.0}


def test_per_round_figures_divide_by_the_micro_steps_of_each_kind():
    raw = {
        "cpu_ns_non_boundary": [6_000, 9_000], "cpu_ns_boundary": [4_000, 3_000],
        "wall_ns_non_boundary": [3_000, 3_000], "wall_ns_boundary": [1_000, 1_000],
    }  # fmt: skip
    figures = per_round_figures(raw, micro_steps=4, accum_steps=4)  # 3 non-boundary micro-steps + 1 boundary
    assert figures == {
        "cpu_us": [2.5, 3.0], "cpu_us_non_boundary": [2.0, 3.0], "cpu_us_boundary": [4.0, 3.0],
        "wall_us": [1.0, 1.0], "wall_us_non_boundary": [1.0, 1.0], "wall_us_boundary": [1.0, 1.0],
    }  # fmt: skip
    every_step_a_boundary = per_round_figures(raw, micro_steps=2, accum_steps=1)
    assert every_step_a_boundary["cpu_us_non_boundary"] is None
    assert every_step_a_boundary["cpu_us_boundary"] == [2.0, 1.5]


def test_own_cost_is_the_median_of_paired_differences_not_the_difference_of_medians():
    variant = {"cpu_us": [10.0, 20.0, 30.0], "cpu_us_non_boundary": None}
    baseline = {"cpu_us": [9.0, 21.0, 27.0], "cpu_us_non_boundary": None}
    own = own_cost(variant, baseline)
    assert own["cpu_us"] == {"median": 1.0, "p25": 0.0, "p75": 2.0, "iqr": 2.0}  # rounds differ by 1, -1, 3
    assert own["cpu_us_non_boundary"] is None


def test_config_refuses_a_round_shorter_than_a_window():
    with pytest.raises(ValueError, match="micro_steps must be >= 8, got 4"):
        OverheadConfig(accum_steps=(1, 8), micro_steps=4)
    with pytest.raises(ValueError, match="accum_steps needs values >= 1"):
        OverheadConfig(accum_steps=(0,))


def test_overhead_refuses_options_it_does_not_use(capsys):
    assert harness.main(["--overhead", "--nproc", "3", "--no-memory"]) == 2
    assert "drop --nproc --no-memory" in capsys.readouterr().err
    assert harness.main(["--micro-steps", "10"]) == 2
    assert "--micro-steps belongs to --overhead" in capsys.readouterr().err


def test_the_bench_defaults_are_unchanged_without_overhead():
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert bench_cli._config(parser.parse_args([])) == BenchConfig()
    given = bench_cli._config(parser.parse_args(["--accum-steps", "2", "4", "--rounds", "3"]))
    assert (given.accum_steps, given.rounds) == ((2, 4), 3)


def test_overhead_on_cuda_without_a_gpu_is_refused_with_the_fix(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.main(["--overhead", "--device", "cuda"]) == 2
    assert "drop --device cuda" in capsys.readouterr().err
    assert "--device" not in OverheadConfig(device="cpu").command()  # the default is left out of the command
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        OverheadConfig(device="tpu")
