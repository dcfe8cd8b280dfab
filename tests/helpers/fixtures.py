"""Fixtures more than one test module uses; a module takes one by importing it (``from ... import one_thread``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny MLP gains nothing from a second thread, and two threads on two shared cores run 5-10x slower.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
