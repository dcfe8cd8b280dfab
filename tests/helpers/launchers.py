"""Helpers for tests that start real launchers (torchrun, accelerate launch, deepspeed) as subprocesses.

Every launch is bounded: a launcher still running at its timeout is killed with its whole process tree and
the test fails (a hang is a failure, never a pass)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from distaccum.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240.0


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts each worker in a session of its own)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)


def run_torchrun(nproc: int, *script_and_args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node N script args`` on loopback with a free port, one thread per rank, bounded."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *script_and_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user in an activated venv: its bin/ first on PATH, no rank variables inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "PYTEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def start(command: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a launcher in its own process group (so that a hang can be killed with all its workers)."""
    return subprocess.Popen(
        [str(part) for part in command],
        cwd=ROOT,
        env=env or user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    """Wait for ``process``; kill its whole group and fail when it exceeds ``timeout_s`` (a hang is a failure)."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} still running after {timeout_s:.0f} s (killed):\n{output[-4000:]}")
    return process.returncode, output


def launch(
    command: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None, *, expect_success: bool = True
) -> str:
    """Run a launcher to completion; return its combined output. Fails with the output on a wrong exit code."""
    code, output = finish(start(command, env))
    if expect_success:
        assert code == 0, f"{command} exited {code}:\n{output[-6000:]}"
    else:
        assert code != 0, f"{command} succeeded but should have failed:\n{output[-6000:]}"
    return output
