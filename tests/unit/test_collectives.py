"""Rank-consistent scalars in one process, and where NCCL's scalars go (dispatch only: no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distaccum import collectives


def test_scalars_are_the_values_themselves_in_one_process():
    assert not collectives.active()
    assert collectives.sum_over_ranks([1, 2.5]) == [1.0, 2.5]
    assert collectives.min_over_ranks(3) == 3.0
    assert collectives.gather_from_ranks([4, 5]) == [[4, 5]]
    assert collectives.sum_checking_step([1.0, 2.0], step=7) == [1.0, 2.0]
    assert collectives.agree_on_item_mode(12) == (1, 12.0)


class OnGpu(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def parameters(self, recurse: bool = True):
        return iter([SimpleNamespace(device=torch.device("cuda", self.index))])


@pytest.mark.parametrize(
    ("backend", "model_gpu", "expected"), [("nccl", 1, [torch.device("cuda", 1)]), ("nccl", 0, []), ("gloo", 1, [])]
)
def test_nccl_scalars_follow_the_models_gpu(monkeypatch: pytest.MonkeyPatch, backend, model_gpu, expected):
    # A script that did model.to(local_rank) but never torch.cuda.set_device: every rank's scalars would go to cuda:0.
    chosen: list[torch.device] = []
    monkeypatch.setattr(collectives, "active", lambda: True)
    monkeypatch.setattr(collectives.torch_dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    collectives.bind_device(OnGpu(model_gpu))
    assert chosen == expected
