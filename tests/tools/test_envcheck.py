"""`distaccum env`: what the process sees and whether it is consistent, in-process, via `python -m` and torchrun."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distaccum.tools import cli
from tests.helpers.launchers import ROOT, launch, user_env

# The variables `accelerate launch --multi_gpu --num_processes 2` gives rank 1 on a machine without GPU and
# without ACCELERATE_USE_CPU (recorded from a real launch with accelerate 1.15).
ACCELERATE_MULTI_GPU_ON_CPU = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "RANK": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "WORLD_SIZE": "2",
}


def run_env(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["env", *args])
    return code, capsys.readouterr().out


def test_env_single_process_reports_plan_and_is_consistent(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_env(capsys, "--global-batch-size", "32", "--micro-batch-size", "8")
    assert code == 0
    assert "launcher         python" in out and "world_size       1" in out and "backend          gloo" in out
    assert "global_batch_size 32 = accum_steps 4 x micro_batch_size 8 x world_size 1" in out
    assert "cuda             not available" in out or "GPU(s)" in out
    assert out.rstrip().endswith("consistent       yes")


def test_env_plan_that_does_not_divide_exits_nonzero_with_equation(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_env(capsys, "--global-batch-size", "30", "--micro-batch-size", "8")
    assert code == 1
    assert "consistent       NO (1 problem(s))" in out
    assert "global_batch_size 30 is not accum_steps x micro_batch_size x world_size" in out
    assert "nearest valid: 24 or 32" in out


def test_env_accepts_accum_steps_instead_of_global(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_env(capsys, "--micro-batch-size", "8", "--accum-steps", "3")
    assert code == 0 and "global_batch_size 24 = accum_steps 3" in out


def test_env_without_sizes_does_not_invent_a_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_env(capsys)
    assert code == 0 and "not checked (give --global-batch-size and --micro-batch-size)" in out


def test_env_flags_accelerate_launch_on_cpu_without_use_cpu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ACCELERATE_MULTI_GPU_ON_CPU.items():
        monkeypatch.setenv(name, value)
    code, out = run_env(capsys, "--global-batch-size", "32", "--micro-batch-size", "8", "--no-init")
    assert "[rank 1] launcher         accelerate" in out
    trap = not torch.cuda.is_available()  # with CUDA, --multi_gpu is what it says
    assert code == int(trap)
    assert ("gradients are never averaged" in out and "ACCELERATE_USE_CPU=1 accelerate launch" in out) == trap
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    code, out = run_env(capsys, "--global-batch-size", "32", "--micro-batch-size", "8", "--no-init")
    assert code == 0, out


def test_env_flags_contradicting_launcher_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    code, out = run_env(capsys, "--no-init")
    assert code == 1
    assert "rank 2 is outside world_size 2: RANK must be in 0..1" in out
    assert "MASTER_ADDR is not set" in out


def test_python_m_distaccum_env_exit_status() -> None:
    command = [sys.executable, "-m", "distaccum", "env", "--global-batch-size", "32", "--micro-batch-size"]
    good = subprocess.run([*command, "8"], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "accum_steps 4 x micro_batch_size 8" in good.stdout
    bad = subprocess.run([*command, "7"], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "nearest valid: 28 or 35" in bad.stdout


@pytest.mark.slow
def test_env_check_sh_under_torchrun() -> None:
    # 24 = 3 x 8 x 1 is fine on one process; on torchrun's 2 ranks it does not divide. The plan is made for the
    # live world size, both ranks join the group, rank 0 prints one report with both ranks, and the job fails.
    command = ["bash", ROOT / "launch" / "env_check.sh", "--global-batch-size", "24", "--micro-batch-size", "8"]
    out = launch(command, expect_success=False)
    assert "launcher         torchrun" in out and "world_size       2" in out and "backend          gloo" in out
    assert "rank 0: batch plan: global_batch_size 24 is not" in out and "rank 1: batch plan:" in out
    assert "micro_batch_size 8 x world_size 2 = 16 per micro-step; nearest valid: 16 or 32" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 ")) and "cpu" in line]
    assert sorted((row[0], row[1]) for row in table) == [("0", "0"), ("1", "1")]
    assert out.count("consistent       NO (2 problem(s))") == 1  # one report, from rank 0


def test_env_flags_use_cpu_that_drops_the_deepspeed_plugin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # accelerate launch with distributed_type DEEPSPEED sets ACCELERATE_USE_DEEPSPEED=true; ACCELERATE_USE_CPU=1 then
    # makes Accelerate run DDP instead, silently. Without ACCELERATE_USE_CPU it is DeepSpeed's own working setup.
    for name, value in {**ACCELERATE_MULTI_GPU_ON_CPU, "ACCELERATE_USE_DEEPSPEED": "true"}.items():
        monkeypatch.setenv(name, value)
    code, out = run_env(capsys, "--global-batch-size", "32", "--micro-batch-size", "8", "--no-init")
    assert code == 0, out
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    code, out = run_env(capsys, "--global-batch-size", "32", "--micro-batch-size", "8", "--no-init")
    assert code == 1
    assert "Accelerate drops the DeepSpeed plugin silently and runs DDP" in out
    assert "InitProcessGroupKwargs(backend='gloo')" in out
