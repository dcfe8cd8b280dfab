"""Helpers for tests that start real launchers (torchrun, accelerate launch, deepspeed) as subprocesses."""

from __future__ import annotations

import contextlib
import signal
import socket

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
