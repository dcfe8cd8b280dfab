"""The bench harness's fair comparisons: paired per-round ratios in wall and CPU time, the equal-work pairs
(clipping included), the A/A twin's noise floor, and the PNG; the ratio arithmetic on hand-made records."""

from __future__ import annotations

import doctest
import importlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from examples.bench import harness
from examples.bench.harness.methods import MAX_NORM, METHODS
from examples.bench.harness.order import ORDER, design_note, round_order, williams_rows
from examples.bench.harness.plot import _rows_from_cases, plot_results
from examples.bench.harness.report_ratios import format_ratios, paired_ratio, paired_ratios, resolves
from examples.bench.harness.worker import _OneAtATime

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAIR_METHODS = (
    "no_sync", "no_sync_twin", "no_sync_clip", "distaccum", "distaccum_items", "distaccum_clip", "no_sync_logged"
)  # fmt: skip
PAIRS = ("distaccum/no_sync", "distaccum_items/no_sync", "distaccum_clip/no_sync_clip", "distaccum/no_sync_logged")
ROUNDS = 4
pytestmark = pytest.mark.timeout(180)  # the 2-rank run takes ~20-30 s on 2 busy cores
RATIO_KEYS = {"median", "p25", "p75", "low", "high", "half_width", "rounds"}


@pytest.fixture(scope="module")
def fair_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One real 2-rank run of the fairness methods through the command line (tiny MLP, k=1 and 3), with --json."""
    out = tmp_path_factory.mktemp("fair")
    argv = [
        "--size", "tiny", "--models", "mlp", "--accum-steps", "1", "3", "--methods", *FAIR_METHODS,
        "--warmup", "1", "--rounds", str(ROUNDS), "--no-memory", "--memory-sweep", "2", "--timeout", "120",
        "--json", str(out / "bench.json"), "--table", str(out / "bench.txt"),
    ]  # fmt: skip
    assert harness.main(argv) == 0
    return json.loads((out / "bench.json").read_text()), out


def _is_ratio(value: dict | None) -> bool:
    return (
        value is not None
        and set(value) == RATIO_KEYS
        and value["rounds"] == ROUNDS
        and all(isinstance(value[key], float) and value[key] > 0 for key in RATIO_KEYS - {"rounds"})
        and value["p25"] <= value["median"] <= value["p75"]
        and value["low"] <= value["high"]
    )


def test_every_method_has_paired_wall_and_cpu_ratios_against_no_sync(fair_run):
    results, _ = fair_run
    assert [case["accum_steps"] for case in results["cases"]] == [1, 3]
    for case in results["cases"]:
        assert list(case["paired_vs_no_sync"]) == [name for name in FAIR_METHODS if name != "no_sync"]
        for name, ratio in case["paired_vs_no_sync"].items():
            assert _is_ratio(ratio["wall"]) and _is_ratio(ratio["cpu"]), (name, ratio)
            assert case["methods"][name]["cpu_vs_no_sync"] > 0  # ratio of the medians, next to the time one


def test_the_three_equal_work_pairs_have_wall_and_cpu_ratios(fair_run):
    results, _ = fair_run
    for case in results["cases"]:
        assert tuple(case["equal_work_pairs"]) == PAIRS
        for key, pair in case["equal_work_pairs"].items():
            assert f"{pair['method']}/{pair['baseline']}" == key
            assert _is_ratio(pair["wall"]) and _is_ratio(pair["cpu"]), key


def test_the_clipping_pair_makes_the_same_update_and_really_clips(fair_run):
    results, _ = fair_run
    for case in results["cases"]:
        methods = case["methods"]
        assert methods["distaccum_clip"]["update_reference"] == "no_sync_clip"
        assert methods["distaccum_clip"]["update_mismatch_vs_reference"] < 1e-4
        assert case["equal_work_pairs"]["distaccum_clip/no_sync_clip"]["update_mismatch"] < 1e-4
        # The tiny MLP's gradient norm (~0.1) is far above MAX_NORM: both clipped, so both left (b)'s update.
        assert methods["no_sync_clip"]["update_mismatch_vs_no_sync"] > 0.5, MAX_NORM
        assert methods["distaccum_clip"]["update_mismatch_vs_no_sync"] > 0.5
        for name in ("no_sync_twin", "distaccum", "distaccum_items"):  # equal micro-batches: (b)'s update
            assert methods[name]["update_reference"] == "no_sync"
            assert methods[name]["update_mismatch_vs_reference"] < 1e-4, name


def test_the_logging_loop_makes_distaccums_one_scalar_collective_and_the_same_update(fair_run):
    # (u) is (b) plus one all-reduce of its window loss per step: the collective distaccum's boundary makes.
    for case in fair_run[0]["cases"]:
        methods = case["methods"]
        assert methods["no_sync_logged"]["other_collectives_per_step"] == 1
        assert methods["distaccum"]["other_collectives_per_step"] == 1
        assert methods["no_sync"]["other_collectives_per_step"] == 0
        assert methods["no_sync_logged"]["update_mismatch_vs_no_sync"] == 0.0


def test_the_twin_against_no_sync_is_the_noise_floor(fair_run):
    results, out = fair_run
    for case, targets in zip(results["cases"], results["targets"]["per_case"], strict=True):
        floor = case["noise_floor"]
        assert (floor["method"], floor["baseline"], floor["resolution"]) == ("no_sync_twin", "no_sync", 0.01)
        assert floor["wall"] == case["paired_vs_no_sync"]["no_sync_twin"]["wall"] and _is_ratio(floor["cpu"])
        assert floor["resolves"] is resolves(floor["cpu"]) and targets["noise_floor_resolves"] is floor["resolves"]
    table = (out / "bench.txt").read_text()
    assert table.count("noise floor (A/A) (k) / (b)") == 2
    assert table.count(f"these {ROUNDS} rounds resolve 1% in CPU time: ") == 2
    assert "equal work (j) / (i): distaccum_clip/no_sync_clip" in table


def test_a_png_is_written_next_to_the_json(fair_run):
    _, out = fair_run
    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_the_new_methods_continue_the_letters():
    assert [METHODS[name].letter for name in ("no_sync_clip", "distaccum_clip", "no_sync_twin")] == ["i", "j", "k"]
    assert len({cls.letter for cls in METHODS.values()}) == len(METHODS)


# The arithmetic, on hand-made records (no processes).


HARNESS = Path(harness.__file__).parent
WITH_EXAMPLES = [
    f"examples.bench.harness.{path.stem}" for path in sorted(HARNESS.glob("*.py")) if ">>>" in path.read_text()
]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name):
    # tests/unit/test_doctests.py runs those of the distaccum package; the harness is not in it.
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, name


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ratio = paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])  # per round: 2, 2, 3
    assert (ratio["median"], ratio["p25"], ratio["p75"], ratio["rounds"]) == (2.0, 2.0, 2.5, 3)
    assert 2.0 <= ratio["low"] <= ratio["median"] <= ratio["high"] <= 3.0


def test_drift_that_hits_both_methods_in_a_round_cancels():
    # Rounds 10x apart (a busy machine): the ratio of medians is not 1.0, the paired ratio is exactly 1.0.
    baseline = [0.1, 1.0, 0.1, 1.0, 1.0]
    ratio = paired_ratio([1.01 * t for t in baseline], baseline)
    assert ratio["median"] == pytest.approx(1.01)
    assert ratio["half_width"] == pytest.approx(0.0, abs=1e-12)


def test_the_bootstrap_interval_is_reproducible_and_narrows_with_more_rounds():
    draw = random.Random(1)
    noisy = [1.0 + draw.gauss(0.0, 0.02) for _ in range(400)]
    few, many = paired_ratio(noisy[:8], [1.0] * 8), paired_ratio(noisy, [1.0] * 400)
    assert paired_ratio(noisy[:8], [1.0] * 8) == few
    assert few["low"] <= few["median"] <= few["high"]
    assert many["half_width"] < few["half_width"] / 3  # ~1/sqrt(50) of it
    assert many["half_width"] < 0.01 and abs(many["median"] - 1) < 0.01


def test_paired_ratio_refuses_rounds_that_do_not_pair():
    with pytest.raises(ValueError, match="3 times against 2 baseline times: pair them round by round"):
        paired_ratio([1.0, 1.0, 1.0], [1.0, 1.0])
    assert paired_ratio([], []) is None


@pytest.mark.parametrize(
    ("median", "half_width", "expected"),
    [(1.004, 0.006, True), (1.004, 0.012, False), (0.985, 0.002, False), (0.991, 0.0099, True)],
)
def test_resolving_1_percent_needs_the_median_and_the_half_width_within_it(median, half_width, expected):
    assert resolves({"median": median, "half_width": half_width}) is expected


def _record(label: str, seconds: list[float], cpu: list[float], mismatch: float = 0.0) -> dict:
    return {
        "label": label,
        "seconds_per_step": seconds,
        "cpu_seconds_per_step": cpu,
        "update_mismatch_vs_reference": mismatch,
    }


def _hand_made_methods() -> dict:
    return {
        "no_sync": _record("(b) no_sync", [1.0, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]),
        "no_sync_twin": _record("(k) twin", [1.0, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]),
        "distaccum": _record("(c) distaccum", [1.1, 2.2, 1.1, 2.2], [1.05, 1.05, 1.05, 1.05], 1e-7),
        "no_sync_clip": _record("(i) clip", [2.0, 4.0, 2.0, 4.0], [2.0, 2.0, 2.0, 2.0]),
        "distaccum_clip": _record("(j) distaccum clip", [2.0, 4.0, 2.0, 4.0], [2.1, 2.1, 2.1, 2.1], 2e-7),
    }


def test_paired_ratios_of_hand_made_records():
    figures = paired_ratios(_hand_made_methods())
    assert set(figures["paired_vs_no_sync"]) == {"no_sync_twin", "distaccum", "no_sync_clip", "distaccum_clip"}
    assert figures["paired_vs_no_sync"]["distaccum"]["wall"]["median"] == pytest.approx(1.1)
    pairs = figures["equal_work_pairs"]
    assert list(pairs) == ["distaccum/no_sync", "distaccum_clip/no_sync_clip"]  # no distaccum_items in this run
    assert pairs["distaccum_clip/no_sync_clip"]["wall"]["median"] == pytest.approx(1.0)
    assert pairs["distaccum_clip/no_sync_clip"]["cpu"]["median"] == pytest.approx(1.05)
    assert pairs["distaccum_clip/no_sync_clip"]["update_mismatch"] == 2e-7
    floor = figures["noise_floor"]
    assert floor["cpu"]["median"] == 1.0 and floor["cpu"]["half_width"] == 0.0 and floor["resolves"] is True


def test_without_the_twin_there_is_no_noise_floor():
    methods = _hand_made_methods()
    del methods["no_sync_twin"]
    assert paired_ratios(methods)["noise_floor"] is None


def test_format_ratios_prints_the_pairs_and_the_verdict():
    methods = _hand_made_methods()
    methods["no_sync_twin"]["cpu_seconds_per_step"] = [1.0, 1.1, 0.9, 1.05]
    lines = format_ratios({"methods": methods, **paired_ratios(methods)})
    text = "\n".join(lines)
    assert "equal work (j) / (i): distaccum_clip/no_sync_clip" in text and "update mismatch 2.0e-07" in text
    assert "these 4 rounds resolve 1% in CPU time: no (CPU median 2.5% from 1" in text


def _hand_made_results() -> dict:
    def case(k: int) -> dict:
        methods = {
            name: {"label": f"({METHODS[name].letter}) {name}", "median_s": k / 10, "p25_s": k / 11, "p75_s": k / 9}
            for name in ("no_sync", "distaccum")
        }
        return {"model": "mlp", "micro_batch_size": 8, "accum_steps": k, "methods": methods}

    sweep = [
        {"model": "mlp", "micro_batch_size": 8, "accum_steps": k, "virtual_peak_mib": 300.0, "real_peak_mib": 300.0 + k}
        for k in (1, 2, 4)
    ]
    return {
        "config": {"nproc": 2, "rounds": 3},
        "environment": {"device": "cpu", "backend": "gloo", "threads_per_rank": 1, "torch": "x"},
        "cases": [case(1), case(8)],
        "memory_sweep": sweep,
    }


def test_plot_writes_a_png_of_hand_made_results(tmp_path):
    path = plot_results(_hand_made_results(), tmp_path / "figures" / "bench.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'distaccum\[bench\]'"):
        plot_results(_hand_made_results(), tmp_path / "bench.png")


def test_bench_plot_without_matplotlib_stops_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert harness.main(["--size", "tiny", "--plot", str(tmp_path / "bench.png")]) == 2
    assert "pip install 'distaccum[bench]'" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


def test_without_a_sweep_the_memory_panel_plots_the_timed_cases_peaks():
    results = _hand_made_results()
    results["memory_sweep"] = []
    for case in results["cases"]:
        case["methods"]["distaccum"]["peak_mib"] = 300.0
        case["methods"]["real_batch"] = {**case["methods"]["no_sync"], "peak_mib": 300.0 * case["accum_steps"]}
    rows = _rows_from_cases(results)
    assert [(row["accum_steps"], row["virtual_peak_mib"], row["real_peak_mib"]) for row in rows] == [
        (1, 300.0, 300.0),
        (8, 300.0, 2400.0),
    ]
    results["cases"] = [{**case, "methods": {"no_sync": case["methods"]["no_sync"]}} for case in results["cases"]]
    assert _rows_from_cases(results) == []  # no distaccum and no real batch: nothing to draw


def test_a_memory_job_moves_each_micro_batch_when_the_method_reaches_it():
    # The timed job stages a whole round on the device; a memory job hands micro-batches over one at a time, as a
    # data loader does, so that k staged micro-batches are not counted in a method's peak ("meta": no storage).
    batches = [(torch.ones(2, 3) * i, torch.zeros(2)) for i in range(4)]
    staged = _OneAtATime(batches, torch.device("meta"))
    assert len(staged) == 4 and len(staged[1:3]) == 2
    assert all(x.is_meta and y.is_meta for x, y in staged)
    assert not batches[0][0].is_meta  # the round itself stays where it was


@pytest.mark.parametrize("count", range(1, 10))
def test_the_round_order_balances_positions_and_predecessors(count):
    # A rotation keeps every method behind the same one: its carry-over (measured: 1.035 vs 0.939 for one pair in
    # two rotating orders) never averages out. The Williams design puts each after each other equally often.
    rows = williams_rows(count)
    assert len(rows) == (count if count % 2 == 0 else 2 * count)
    assert all(sorted(row) == list(range(count)) for row in rows)
    for position in range(count):
        assert sorted(row[position] for row in rows) == sorted(list(range(count)) * (len(rows) // count))
    pairs = Counter((row[i], row[i + 1]) for row in rows for i in range(count - 1))
    expected = {(a, b) for a in range(count) for b in range(count) if a != b}
    assert set(pairs) == expected
    assert set(pairs.values()) <= {len(rows) // count}


def test_round_order_cycles_through_the_design_and_the_report_says_so():
    names = ["a", "b", "c", "d"]
    orders = [round_order(names, index) for index in range(9)]
    assert orders[0] == ["a", "b", "d", "c"] and orders[4] == orders[0] and orders[8] == orders[0]
    assert len({tuple(order) for order in orders}) == 4
    results = {"config": {"methods": names, "rounds": 8}, "environment": {"round_order": ORDER}}
    assert design_note(results) == "order balanced for carry-over (Williams design of 4 rows; 2 whole cycles)"
    results["config"]["rounds"] = 10
    assert "not a whole number of cycles: 2 over" in design_note(results)
    assert design_note({"config": results["config"], "environment": {}}) == "order rotating"  # a run made before
    with pytest.raises(ValueError, match="count=0"):
        williams_rows(0)
