"""Shared fixtures: every test starts without a process group and with the environment it found."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch.distributed as torch_dist

_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def clean_distributed_state() -> Iterator[None]:
    saved = dict(os.environ)
    for name in _RANK_VARIABLES:
        os.environ.pop(name, None)
    yield
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
