"""`distaccum plan`: batch arithmetic, elastic world sizes, bytes per sync mode, the estimate, input errors.

Expectations are computed here from the formulas of the issue (ring all-reduce sends 2(W-1)/W x S per rank,
reduce-scatter (W-1)/W x S, S = params x bytes per element), never copied from the program's output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from distaccum.tools import cli, planner
from tests.helpers.launchers import ROOT, user_env

MB = 10**6


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = cli.main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def plan_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """stderr of a refused command line; argparse's refusals and the planner's both exit with status 2."""
    try:
        code = cli.main(["plan", *args])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert "Traceback" not in captured.err
    return captured.err


def modes_by_key(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["wrapper"], m["mode"]): m for m in report["modes"]}


def sizes(global_: int, micro: int, world: int) -> list[str]:
    return ["--global-batch-size", str(global_), "--micro-batch-size", str(micro), "--world-size", str(world)]


def test_mlp_16_8m_fp32_on_two_ranks_with_eight_micro_steps(capsys: pytest.CaptureFixture[str]) -> None:
    report = plan_json(capsys, *sizes(256, 16, 2), "--params", "16.8M")
    assert report["plan"] == {
        "global_batch_size": 256,
        "micro_batch_size": 16,
        "accum_steps": 8,
        "world_size": 2,
        "equation": "global_batch_size 256 = accum_steps 8 x micro_batch_size 16 x world_size 2",
    }
    assert report["gradient"] == {"params": 16_800_000, "dtype": "fp32", "bytes_per_element": 4, "bytes": 67.2 * MB}
    # On 2 ranks a ring all-reduce sends 2 x 1/2 x 67.2 MB = 67.2 MB per rank; syncing every micro-batch 8 times that.
    step = report["per_step"]
    assert step["distaccum"] == {
        "reductions": 1,
        "gradient_bytes_reduced": 67.2 * MB,
        "bytes_sent_per_rank": 67.2 * MB,
        "estimate_s": None,
    }
    assert step["every_micro_batch"]["reductions"] == 8
    assert step["every_micro_batch"]["gradient_bytes_reduced"] == 537.6 * MB
    assert step["every_micro_batch"]["bytes_sent_per_rank"] == 537.6 * MB
    modes = modes_by_key(report)
    assert set(modes) == {("ddp", "boundary"), ("ddp", "every"), ("fsdp", "boundary")} | {
        ("fsdp", "sharded"),
        ("fsdp", "every"),
    }
    # FSDP over 2 ranks: a reduce-scatter sends 1/2 x 67.2 MB; a shard holds 8.4M params x 4 bytes.
    assert modes["fsdp", "boundary"]["reduce_scatters"] == 1 and modes["fsdp", "boundary"]["all_reduces"] == 0
    assert modes["fsdp", "boundary"]["bytes_sent_per_rank"] == 33.6 * MB
    assert modes["fsdp", "boundary"]["grad_bytes_per_rank"] == 67.2 * MB
    assert not modes["fsdp", "boundary"]["grad_sharded"]
    assert modes["fsdp", "sharded"]["reduce_scatters"] == 8
    assert modes["fsdp", "sharded"]["bytes_sent_per_rank"] == 8 * 33.6 * MB
    assert modes["fsdp", "sharded"]["grad_bytes_per_rank"] == 33.6 * MB and modes["fsdp", "sharded"]["grad_sharded"]
    assert modes["ddp", "every"]["grad_bytes_per_rank"] == 67.2 * MB
    assert report["network"] is None and any("--bandwidth" in note for note in report["notes"])


@pytest.mark.parametrize(
    ("global_", "micro", "world", "accum_steps"), [(1024, 16, 8, 8), (96, 4, 3, 8), (64, 8, 2, 4), (48, 8, 6, 1)]
)
def test_syncing_every_micro_batch_sends_accum_steps_times_the_bytes(
    capsys: pytest.CaptureFixture[str], global_: int, micro: int, world: int, accum_steps: int
) -> None:
    report = plan_json(capsys, *sizes(global_, micro, world), "--params", "125M", "--dtype", "bf16")
    once = 2 * (world - 1) / world * 125_000_000 * 2
    assert report["plan"]["accum_steps"] == accum_steps
    assert report["per_step"]["distaccum"]["bytes_sent_per_rank"] == pytest.approx(once, abs=1)
    assert report["per_step"]["every_micro_batch"]["bytes_sent_per_rank"] == pytest.approx(accum_steps * once, abs=1)
    assert report["per_step"]["ratio"] == pytest.approx(accum_steps)


def test_elastic_world_sizes_are_those_that_keep_global_and_micro_batch(capsys: pytest.CaptureFixture[str]) -> None:
    report = plan_json(capsys, *sizes(96, 4, 2))
    expected = [{"world_size": n, "accum_steps": 96 // (4 * n)} for n in range(1, 97) if 96 % (4 * n) == 0]
    assert report["elastic_world_sizes"] == expected
    assert [e["world_size"] for e in expected] == [1, 2, 3, 4, 6, 8, 12, 24]
    assert planner.elastic_world_sizes(100, 16) == []  # 100 is no multiple of 16: no world size works


def test_without_params_only_the_arithmetic_and_how_to_get_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    report = plan_json(capsys, *sizes(1024, 16, 8))
    assert report["gradient"] is None and report["per_step"] is None and report["modes"] == []
    assert cli.main(["plan", *sizes(1024, 16, 8)]) == 0
    out = capsys.readouterr().out
    assert "global_batch_size 1024 = accum_steps 8 x micro_batch_size 16 x world_size 8" in out
    assert "add --params" in out and "all-reduce" not in out


def test_hsdp_reduce_scatters_every_micro_step_and_all_reduces_across_replicas_at_the_boundary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 8 ranks = 2 replicas x shard groups of 4; k = 4; 1000 fp32 params, S = 4000 bytes, a shard 250 params.
    report = plan_json(capsys, *sizes(64, 2, 8), "--params", "1000", "--replicas", "2")
    modes = modes_by_key(report)
    scatter, reduce_shard = 3 / 4 * 4000, 2 * 1 / 2 * 1000
    expected = {  # (reduce-scatters, all-reduces, bytes sent per rank, gradient bytes held per rank)
        "boundary": (1, 1, scatter + reduce_shard, 4000),
        "sharded": (4, 1, 4 * scatter + reduce_shard, 1000),
        "every": (4, 4, 4 * (scatter + reduce_shard), 1000),
    }
    for mode, (scatters, reduces, sent, memory) in expected.items():
        row = modes["hsdp", mode]
        assert (row["shard_group"], row["replicas"]) == (4, 2)
        assert (row["reduce_scatters"], row["all_reduces"], row["bytes_sent_per_rank"]) == (scatters, reduces, sent)
        assert row["grad_bytes_per_rank"] == memory


def test_hsdp_with_one_rank_per_shard_group_is_plain_replication(capsys: pytest.CaptureFixture[str]) -> None:
    report = plan_json(capsys, *sizes(64, 2, 4), "--params", "1000", "--replicas", "4")
    modes = modes_by_key(report)
    for mode in ("boundary", "every"):
        hsdp, ddp = dict(modes["hsdp", mode]), dict(modes["ddp", mode])
        assert hsdp.pop("wrapper") == "hsdp" and ddp.pop("wrapper") == "ddp"
        assert hsdp == ddp


def test_estimate_is_latency_per_collective_plus_bytes_over_bandwidth(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*sizes(256, 16, 2), "--params", "16.8M", "--bandwidth", "1Gbit", "--latency", "1ms"]
    report = plan_json(capsys, *args)
    rate = 1e9 / 8
    assert report["network"]["bandwidth_bytes_per_s"] == rate and report["network"]["latency_s"] == 1e-3
    assert report["per_step"]["distaccum"]["estimate_s"] == pytest.approx(1e-3 + 67.2 * MB / rate)
    assert report["per_step"]["every_micro_batch"]["estimate_s"] == pytest.approx(8 * (1e-3 + 67.2 * MB / rate))
    sharded = modes_by_key(report)["fsdp", "sharded"]
    assert sharded["estimate_s"] == pytest.approx(8 * 1e-3 + 8 * 33.6 * MB / rate)
    assert "not a measurement" in report["network"]["model"] and "nodes" not in report["network"]["model"]
    on_two_nodes = plan_json(capsys, *args, "--nodes", "2")["network"]
    assert on_two_nodes["nodes"] == 2 and "inter-node link" in on_two_nodes["model"]


def test_text_output_is_an_aligned_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*sizes(1024, 16, 8), "--params", "7e9", "--dtype", "bf16", "--bandwidth", "100Gbit", "--nodes", "2"]
    assert cli.main(["plan", *args, "--replicas", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["wrapper", "mode"])
    table = lines[start : start + 9]  # the header, ddp x 2, fsdp x 3, hsdp x 3
    assert [line.split()[0] for line in table[1:]] == ["ddp"] * 2 + ["fsdp"] * 3 + ["hsdp"] * 3
    assert len({len(line) for line in table}) == 1  # the last column is right-aligned, so every row ends together
    assert "14 GB" in "\n".join(lines) and "inter-node link" in "\n".join(lines)


PARAM_COUNTS = {"7e9": 7 * 10**9, "7B": 7 * 10**9, "125M": 125 * 10**6, "16.8M": 16_800_000, "350k": 350_000}
BANDWIDTHS = {"100Gbit": 100e9 / 8, "10Gbit": 10e9 / 8, "1Gbit": 1e9 / 8, "100Mbit": 100e6 / 8, "25GB": 25e9}
BANDWIDTHS |= {"1e9": 1e9 / 8, "400Gbps": 400e9 / 8, "100 Gbit/s": 100e9 / 8, "1Gibit": 2**30 / 8}


@pytest.mark.parametrize(("text", "count"), [*PARAM_COUNTS.items(), ("1.5T", 15 * 10**11), ("1000", 1000)])
def test_params_accept_suffixes(text: str, count: int) -> None:
    assert planner.parse_params(text) == count


@pytest.mark.parametrize(("text", "bytes_per_s"), BANDWIDTHS.items())
def test_bandwidth_units(text: str, bytes_per_s: float) -> None:
    assert planner.parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize(("text", "seconds"), [("20us", 20e-6), ("0.5ms", 5e-4), ("2e-5", 2e-5), ("0", 0.0)])
def test_latency_units(text: str, seconds: float) -> None:
    assert planner.parse_latency(text) == pytest.approx(seconds)


def test_dtype_names() -> None:
    assert [planner.parse_dtype(name) for name in ("float32", "BF16", "bfloat16", "torch.float16")] == [
        "fp32",
        "bf16",
        "bf16",
        "fp16",
    ]


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [
        ("--params", "7X", "is not a parameter count.*e.g. 7e9, 7B"),
        ("--params", "0", "is not a parameter count"),
        ("--params", "-5M", "is not a parameter count"),
        ("--bandwidth", "100G", r"is not a bandwidth.*'100Gbit'"),
        ("--bandwidth", "0Gbit", "is not a bandwidth: it must be a number > 0"),
        ("--bandwidth", "fast", "is not a bandwidth"),
        ("--latency", "-1", "is not a latency: it must be a number >= 0"),
        ("--dtype", "int8", "is not a gradient dtype: use fp32"),
        ("--world-size", "0", "is not a positive whole number: it must be >= 1"),
        ("--micro-batch-size", "-16", "is not a positive whole number"),
        ("--global-batch-size", "1.5", "is not a positive whole number"),
    ],
)
def test_bad_flag_values_name_the_flag_value_and_rule(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, rule: str
) -> None:
    flags = {"--global-batch-size": "1024", "--micro-batch-size": "16", "--world-size": "8", "--params": "1B"}
    flags[flag] = value
    err = plan_error(capsys, *[f"{name}={text}" for name, text in flags.items()])  # "=": "-5M" is a value
    assert f"argument {flag}: '{value}' " in err
    assert re.search(rule, err), err


def test_batch_plan_errors_print_the_equation_and_the_nearest_valid_values(capsys: pytest.CaptureFixture[str]) -> None:
    err = plan_error(capsys, *sizes(1000, 16, 8))
    assert err.startswith("distaccum plan: error: --global-batch-size 1000 --micro-batch-size 16 --world-size 8: ")
    assert "16 x world_size 8 = 128 per micro-step; nearest valid: 896 or 1024" in err
    err = plan_error(capsys, *sizes(1024, 16, 3))
    assert "nearest valid: 1008 or 1056" in err and "keep both on --world-size 1, 2, 4, 8, 16, 32, 64" in err


@pytest.mark.parametrize("flag", ["--replicas", "--nodes"])
def test_replicas_and_nodes_must_divide_the_world_size(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    err = plan_error(capsys, *sizes(1024, 16, 8), flag, "3")
    assert f"{flag} 3 does not divide --world-size 8" in err and "use one of 1, 2, 4, 8" in err


def test_help_states_the_estimate_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "collectives x LATENCY + bytes each rank sends / BANDWIDTH" in text
    assert "2(n-1)/n x S" in text and "(n-1)/n x S" in text and "default 20us" in text


def test_python_m_distaccum_plan_end_to_end() -> None:
    command = [sys.executable, "-m", "distaccum", "plan", *sizes(1024, 16, 8), "--params", "7B", "--dtype", "bf16"]
    run = subprocess.run(
        [*command, "--bandwidth", "100Gbit", "--nodes", "2", "--json"],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["plan"]["accum_steps"] == 8 and report["gradient"]["bytes"] == 14 * 10**9
    boundary = report["per_step"]["distaccum"]
    assert boundary["bytes_sent_per_rank"] == 2 * 7 / 8 * 14 * 10**9
    assert boundary["estimate_s"] == pytest.approx(20e-6 + 24.5e9 / 12.5e9)
    bad = subprocess.run(
        [*command, "--replicas", "3"], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "--replicas 3 does not divide --world-size 8" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""


SIZES = ("--global-batch-size", "1024", "--micro-batch-size", "16", "--world-size", "8")


def test_noise_scale_places_the_batch_on_mccandlish_curve(capsys: pytest.CaptureFixture[str]) -> None:
    noise = plan_json(capsys, *SIZES, "--noise-scale", "256")["noise_scale"]
    # B = 4 x B_simple: steps S_min (1 + 1/4), samples E_min (1 + 4).
    assert noise["batch_over_noise_scale"] == 4.0
    assert noise["steps_over_min"] == 1.25 and noise["samples_over_min"] == 5.0
    assert plan_json(capsys, *SIZES)["noise_scale"] is None


def test_noise_scale_from_a_training_log_takes_its_last_value(capsys, tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    rows = [{"step": 1, "noise_scale": None}, {"step": 2, "noise_scale": 100.0}, {"step": 3, "noise_scale": 512}]
    log.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    noise = plan_json(capsys, *SIZES, "--log", str(log))["noise_scale"]
    assert noise["b_simple"] == 512.0 and noise["batch_over_noise_scale"] == 2.0
    assert "the last of 2 values" in noise["source"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("not json\n", "line 1 is not JSON"),
        ('{"noise_scale": null}\n', "no line has a positive"),
    ],
)
def test_a_log_without_a_noise_scale_is_an_error_that_says_how_to_write_one(capsys, tmp_path, content, message):
    log = tmp_path / "steps.jsonl"
    if content is not None:
        log.write_text(content)
    error = plan_error(capsys, *SIZES, "--log", str(log))
    assert f"--log {log}: {message}" in error
    if content is not None:
        assert "Accumulator(..., noise_scale=0.95)" in error


def test_log_and_noise_scale_together_or_a_bad_noise_scale_are_refused(capsys, tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    log.write_text('{"noise_scale": 3}\n')
    assert "give one of them" in plan_error(capsys, *SIZES, "--log", str(log), "--noise-scale", "3")
    assert "--noise-scale" in plan_error(capsys, *SIZES, "--noise-scale", "-1")
