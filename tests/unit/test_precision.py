"""Low-precision parameters under accumulation: one warning that says what differs and the fix, and none where
the gradients are summed in float32 (float32 parameters, FSDP2 with a float32 reduce dtype) or nothing sums."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan


def build(model: nn.Module, accum_steps: int) -> Accumulator:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Accumulator(model, optimizer, BatchPlan(accum_steps=accum_steps, micro_batch_size=2))


def test_bf16_parameters_under_accumulation_warn_once_with_the_fix():
    with pytest.warns(
        UserWarning, match=r"parameters in bfloat16: .* summed over the 8 micro-steps .*autocast.*reduce_dtype"
    ) as caught:
        build(nn.Linear(4, 2).to(torch.bfloat16), accum_steps=8)
    assert len([w for w in caught if "bfloat16" in str(w.message)]) == 1


def test_no_warning_in_float32_or_without_accumulation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(nn.Linear(4, 2), accum_steps=8)
        build(nn.Linear(4, 2).to(torch.bfloat16), accum_steps=1)


def test_fsdp2_with_a_float32_reduce_dtype_does_not_warn(tmp_path: Path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    summed_in_fp32 = fully_shard(
        nn.Linear(4, 2).to(torch.bfloat16), mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(summed_in_fp32, accum_steps=4)
    with pytest.warns(UserWarning, match=r"parameters in bfloat16"):
        build(fully_shard(nn.Linear(4, 2).to(torch.bfloat16), mesh=mesh), accum_steps=4)
