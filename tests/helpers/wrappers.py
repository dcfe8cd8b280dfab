"""Wrap a model in DDP, FSDP1 or FSDP2 as a user would, read its full weights, count its gradient reductions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from tests.helpers.common import count_calls


def wrap(model: nn.Module, backend: str, world_size: int) -> nn.Module:
    if backend == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    if backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        return model
    raise ValueError(backend)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: value.detach().clone() for name, value in state.items()}


@contextlib.contextmanager
def count_reductions(model: nn.Module, backend: str) -> Iterator[list[int]]:
    """Counts gradient reductions: a DDP comm hook, or the reduce-scatter FSDP calls."""
    counter = [0]
    if backend == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            counter[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
        yield counter
        return
    with count_calls(torch_dist, ("reduce_scatter_tensor", "reduce_scatter_single"), counter):
        yield counter
