"""Helpers for tests that start real launchers (torchrun, accelerate launch, deepspeed) as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import psutil


def free_port() -> int:
    """A port the OS just handed out on loopback (never a fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
