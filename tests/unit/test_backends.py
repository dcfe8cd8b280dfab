"""Backend selection: the registry picks one class per wrapper, in order, and loads optional ones lazily."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan, backends, checkpoint
from distaccum.backends.base import Backend, PlainBackend


@pytest.fixture
def one_rank_group(tmp_path: Path) -> None:
    # A real single-rank gloo group: DDP and FSDP refuse to wrap without one (conftest destroys it afterwards).
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)


def test_plain_module_gets_the_plain_backend():
    backend = backends.select(nn.Linear(2, 1), world_size=1)
    assert type(backend) is PlainBackend and backend.name == "plain"
    assert backend.grads_in_params and backend.checkpoint_layout == "replicated"


def test_plain_module_on_several_ranks_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"plain Linear but world_size is 2.*DistributedDataParallel.*ACCELERATE_USE"):
        backends.select(nn.Linear(2, 1), world_size=2)


@pytest.mark.usefixtures("one_rank_group")
def test_each_wrapper_selects_its_backend():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard

    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
    fsdp1 = FullyShardedDataParallel(
        nn.Linear(2, 1),
        device_id=torch.device("cpu"),
        use_orig_params=True,
        sharding_strategy=ShardingStrategy.NO_SHARD,
    )
    fsdp2 = fully_shard(nn.Linear(2, 1), mesh=init_device_mesh("cpu", (1,)))
    chosen = {name: backends.select(model, 1) for name, model in (("ddp", ddp), ("fsdp1", fsdp1), ("fsdp2", fsdp2))}
    assert {name: backend.name for name, backend in chosen.items()} == {
        "ddp": "ddp",
        "fsdp1": "fsdp1",
        "fsdp2": "fsdp2",
    }
    assert chosen["ddp"].grads_in_params and chosen["ddp"].checkpoint_layout == "replicated"
    for name in ("fsdp1", "fsdp2"):
        assert not chosen[name].grads_in_params and chosen[name].checkpoint_layout == "sharded"


@pytest.mark.usefixtures("one_rank_group")
def test_unwrap_asks_the_backends_for_the_inner_module():
    inner = nn.Linear(2, 1)
    assert checkpoint.unwrap(torch.compile(nn.parallel.DistributedDataParallel(inner))) is inner


@pytest.mark.usefixtures("one_rank_group")
def test_a_compiled_wrapper_selects_the_wrapper_backend():
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
    backend = backends.select(torch.compile(ddp), world_size=1)
    assert backend.name == "ddp" and backend.model is ddp  # no_sync is the DDP's own, under the compiled forward
    assert backends.select(torch.compile(nn.Linear(2, 1)), world_size=1).name == "plain"
    with pytest.raises(ValueError, match=r"plain Linear but world_size is 2"):  # the message names the real module
        backends.select(torch.compile(nn.Linear(2, 1)), world_size=2)


def test_registry_rows_name_backend_classes_in_modules_that_exist():
    import importlib

    for _library, module, name in backends.REGISTRY:
        backend = getattr(importlib.import_module(module), name)
        assert issubclass(backend, Backend) and backend is not Backend, (module, name)
        assert backend.name != "plain"


def test_deepspeed_backend_is_considered_only_after_the_user_imports_deepspeed():
    code = (
        "import sys\n"
        "from distaccum import backends\n"
        "before = [b.name for b in backends._candidates()]\n"
        "assert 'deepspeed' not in sys.modules and 'distaccum.backends.deepspeed' not in sys.modules, before\n"
        "import deepspeed\n"
        "after = [b.name for b in backends._candidates()]\n"
        "print(before, after)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    before, after = result.stdout.strip().splitlines()[-1].split("] [")
    assert "deepspeed" not in before and after.startswith("'deepspeed'"), result.stdout


def test_accumulator_reports_the_selected_backend():
    model = nn.Linear(2, 1)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(accum_steps=2, micro_batch_size=1))
    assert acc.backend == "plain" and acc.grads_in_params


def test_hand_reduction_buckets_keep_order_dtype_and_the_cap():
    from distaccum.backends.ddp import buckets

    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(4, dtype=torch.float64), torch.zeros(5)]
    runs = buckets(grads, cap_bytes=80)  # 20 float32 elements
    assert [[g.numel() for g in run] for run in runs] == [[10, 10], [30], [4], [5]]
    assert [g for run in runs for g in run] == grads
    assert buckets([], 80) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_weight_as_the_backward_seed_gives_the_gradients_of_the_multiply_bit_for_bit(dtype):
    from distaccum.backends.tensors import SeededBackward

    seeded = SeededBackward()

    def gradients(weight: float, seed: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)
        loss = model(torch.randn(6, 5, dtype=dtype)).square().mean()
        if seed:
            seeded(loss, weight)
        else:
            (loss * weight).backward()
        return [p.grad for p in model.parameters()]

    seeds = []
    for weight in (1 / 3, 1 / 3, 0.1, 1.0, 0.0, 7 / 9):
        assert all(torch.equal(a, b) for a, b in zip(gradients(weight, True), gradients(weight, False), strict=True)), (
            weight
        )
        seeds.append(seeded._seeds[(torch.device("cpu"), dtype)][1])
    assert seeds[0] is seeds[1]  # the same value reuses its seed ...
    assert seeds[0] is not seeds[2]  # ... and a new value gets a new one: a seed is never rewritten
    assert float(seeds[0]) == torch.tensor(1 / 3, dtype=dtype).item()


def test_a_loss_of_a_tensor_subclass_is_multiplied_not_seeded():
    from distaccum.backends.tensors import SeededBackward

    class Tagged(torch.Tensor):  # what a DTensor loss (loss-parallel TP) is to the seed: not a plain tensor
        pass

    weight = torch.ones(3, requires_grad=True)
    loss = (weight * 2.0).sum().as_subclass(Tagged)
    seeded = SeededBackward()
    seeded(loss, 0.25)
    assert torch.equal(weight.grad, torch.full((3,), 0.5)) and not seeded._seeds
