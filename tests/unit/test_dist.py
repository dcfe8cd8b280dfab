"""Rank facts from the environment, and the clean shutdown path."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from distaccum import dist


def test_single_process_defaults():
    assert (dist.world_size(), dist.rank(), dist.local_rank()) == (1, 0, 0)
    assert dist.device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert dist.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert not dist.is_initialized()


def test_ranks_come_from_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (dist.world_size(), dist.rank(), dist.local_rank()) == (8, 5, 1)


def test_malformed_environment_variable_names_itself(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"environment variable WORLD_SIZE='two' must be an integer"):
        dist.world_size()


def test_launcher_detection(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("ACCELERATE_", "DEEPSPEED_", "TORCHELASTIC_", "SLURM_"))]:
        monkeypatch.delenv(name)
    assert dist.launcher() == "python"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert dist.launcher() == "torchrun"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert dist.launcher() == "accelerate"


def test_backend_follows_the_hardware_unless_the_environment_names_one(monkeypatch):
    monkeypatch.delenv("DISTACCUM_BACKEND", raising=False)
    assert dist.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setenv("DISTACCUM_BACKEND", "gloo")  # e.g. two ranks sharing one GPU, where NCCL refuses
    assert dist.default_backend() == "gloo"


def test_run_returns_main_result_in_a_single_process():
    assert dist.run(lambda a, b: a + b, 2, b=3) == 5
    assert not dist.is_initialized()


def test_print0_prints_on_rank_zero_only(monkeypatch, capsys):
    dist.print0("hello")
    monkeypatch.setenv("RANK", "1")
    dist.print0("not me")
    assert capsys.readouterr().out == "hello\n"


SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from distaccum import Accumulator, BatchPlan, dist

    def main():
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = Accumulator(model, optimizer, BatchPlan(global_batch_size=8, micro_batch_size=2))
        for _ in range(4):
            with acc.micro_step():
                acc.backward(model(torch.randn(2, 4)).square().mean())
        return acc.optimizer_steps

    assert dist.run(main) == 2
    """
)


@pytest.mark.slow
def test_torchrun_job_using_run_exits_cleanly(tmp_path):
    from tests.helpers.launchers import run_torchrun

    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    for attempt in range(2):
        result = run_torchrun(2, str(script), timeout_s=120)
        assert result.returncode == 0, f"attempt {attempt}: {result.stdout}\n{result.stderr}"
        assert "terminate called" not in result.stderr
