"""Helpers for tests that start real launchers (torchrun, accelerate launch, deepspeed) as subprocesses."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS just handed out on loopback (never a fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
