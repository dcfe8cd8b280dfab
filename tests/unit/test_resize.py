"""auto_micro_batch in one process: what counts as out of memory, how acc.split() cuts a batch, the retry, and the
setups it refuses (the multi-rank agreement is in tests/distributed/test_batches.py)."""

from __future__ import annotations

import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, resize
from tests.helpers.common import loss_fn, make_model


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("HIP out of memory. Tried to allocate"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("CUDA out of memory"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_out_of_memory_is_the_torch_error_or_a_cuda_message(error, expected):
    assert resize.is_out_of_memory(error) is expected


def _accumulator(global_batch_size=12, micro=6, auto=True, model=None):
    model = model or make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = BatchPlan(global_batch_size=global_batch_size, micro_batch_size=micro, world_size=1)
    return model, Accumulator(model, optimizer, plan, auto_micro_batch=auto)


Pair = namedtuple("Pair", "x y")


def test_split_cuts_tensors_tuples_dicts_and_namedtuples_along_dim_0():
    model, acc = _accumulator(auto=False, micro=4)
    x, y = torch.randn(12, 8), torch.randn(12, 4)
    for batch in ((x, y), [x, y], {"x": x, "y": y, "name": "kept"}, Pair(x, y)):
        pieces = []
        for micro in acc.split(batch):
            pieces.append(micro)
            first = micro["x"] if isinstance(micro, dict) else micro[0]
            with acc.micro_step():
                acc.backward(first.sum() * 0 + loss_fn(model(first), first[:, :4]))
        assert len(pieces) == 3 and type(pieces[0]) is type(batch)
        assert torch.equal(torch.cat([p["x"] if isinstance(p, dict) else p[0] for p in pieces]), x)
        if isinstance(batch, dict):
            assert pieces[0]["name"] == "kept"
    assert acc.optimizer_steps == 4


def test_split_refuses_a_batch_that_is_not_one_ranks_share():
    _, acc = _accumulator()
    with pytest.raises(
        ValueError, match=r"batch has 10 samples.*share of global_batch_size 12 over world_size 1 is 12"
    ):
        next(acc.split(torch.randn(10, 8)))
    with pytest.raises(TypeError, match="cuts tensors"):
        next(acc.split(["a", "b"]))


def test_auto_micro_batch_needs_split():
    _, acc = _accumulator()
    with pytest.raises(RuntimeError, match=r"acc.split\(batch\)"), acc.micro_step():
        pass


class FailsAbove(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.inner = make_model()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {x.shape[0]} (test)")
        return self.inner(x)


def assert_one_real_step(trained: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``trained`` took the step that SGD (lr 0.1) on the real batch ``x, y`` takes ``reference`` through."""
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss_fn(reference(x), y).backward()
    optimizer.step()
    for ours, theirs in zip(trained.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_an_out_of_memory_window_runs_again_smaller_and_equals_the_real_batch():
    model = FailsAbove(limit=3)
    reference = make_model()
    torch.manual_seed(3)
    x, y = torch.randn(12, 8), torch.randn(12, 4)
    _, acc = _accumulator(global_batch_size=12, micro=6, model=model)
    with pytest.warns(UserWarning) as record:
        for micro_x, micro_y in acc.split((x, y)):
            with acc.micro_step():
                acc.backward(loss_fn(model(micro_x), micro_y))
    messages = [str(warning.message) for warning in record]
    assert len(messages) == 2
    assert "micro_batch_size 6 ran out of memory" in messages[0] and "with micro_batch_size 4" in messages[0]
    assert "micro_batch_size 4 ran out of memory" in messages[1] and "with micro_batch_size 3" in messages[1]
    # 6 failed, 4 also (> 3), 3 fits: the largest divisor of 12 that fits.
    assert acc.plan.micro_batch_size == 3 and acc.plan.accum_steps == 4
    assert acc.micro_batch_retries == 2 and acc.optimizer_steps == 1 and acc.skipped_steps == 0
    assert_one_real_step(model.inner, reference, x, y)


def test_an_error_that_is_not_out_of_memory_is_not_retried():
    _, acc = _accumulator()
    with pytest.raises(ValueError, match="not memory"):
        for _ in acc.split(torch.randn(12, 8)):
            with acc.micro_step():
                raise ValueError("not memory")
    assert acc.micro_batch_retries == 0


class Buffered(nn.Module):
    """Stands for a DDP module with buffers (what check_model reads: broadcast_buffers and buffers())."""

    def __init__(self, **attributes) -> None:
        super().__init__()
        self.layer = nn.BatchNorm1d(3)
        self.__dict__.update(attributes)


def backend_of(name: str, model: nn.Module):
    """The backend class ``name`` over ``model`` (a stand-in, not a wrapper: only the capability answers are asked)."""
    from distaccum.backends.base import PlainBackend
    from distaccum.backends.ddp import DDPBackend
    from distaccum.backends.fsdp import FSDP2Backend

    if name == "deepspeed":
        from distaccum.backends.deepspeed import DeepSpeedBackend as cls
    else:
        cls = {"plain": PlainBackend, "ddp": DDPBackend, "fsdp2": FSDP2Backend}[name]
    backend = object.__new__(cls)
    backend.model = model
    return backend


@pytest.mark.parametrize(
    ("model", "backend", "message"),
    [
        (nn.Linear(2, 2), "fsdp2", "fsdp2 makes collectives inside forward"),
        (nn.Linear(2, 2), "deepspeed", "deepspeed makes collectives"),
        (Buffered(static_graph=True), "ddp", "static_graph"),
        (nn.Sequential(nn.SyncBatchNorm(3)), "plain", "SyncBatchNorm"),
        (Buffered(broadcast_buffers=True), "ddp", "broadcast_buffers=False"),
    ],
)
def test_setups_with_collectives_inside_forward_or_backward_are_refused(model, backend, message):
    with pytest.raises(ValueError, match=f"auto_micro_batch=True needs.*{message}"):
        resize.check_model(model, backend_of(backend, model))


def test_ddp_without_buffer_broadcast_and_a_plain_model_are_accepted():
    buffered = Buffered(broadcast_buffers=False)
    resize.check_model(buffered, backend_of("ddp", buffered))
    plain = make_model()
    resize.check_model(plain, backend_of("plain", plain))


def test_batch_norm_statistics_of_a_rerun_window_warn_unless_exact():
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    plan = BatchPlan(global_batch_size=8, micro_batch_size=4, world_size=1)
    with pytest.warns(UserWarning, match="batch_norm='exact'"):
        Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            plan,
            auto_micro_batch=True,
            batch_norm="per_micro_batch",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, auto_micro_batch=True, batch_norm="exact")


def test_exact_batch_norm_statistics_count_a_rerun_window_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    reference = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    reference.load_state_dict(net.state_dict())

    class Limited(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)  # BatchNorm has seen the micro-batch before the "allocation" fails
            if x.shape[0] > 3:
                raise torch.OutOfMemoryError("Tried to allocate (test)")
            return out

    model = Limited()
    plan = BatchPlan(global_batch_size=12, micro_batch_size=6, world_size=1)
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), plan, auto_micro_batch=True, batch_norm="exact"
    )
    x = torch.randn(12, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the retries warn
        for micro in acc.split(x):
            with acc.micro_step():
                acc.backward(model(micro).square().mean())
    assert acc.plan.micro_batch_size == 3 and acc.optimizer_steps == 1
    reference(x)  # one forward of the real batch updates the statistics once
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(net[1], name), getattr(reference[1], name), rtol=1e-6, atol=1e-7)


def test_a_rerun_window_leaves_the_grad_scaler_as_one_step_would():
    # The scaler only scales losses inside a window; unscale, the overflow check and update happen at the step,
    # after the ranks agreed: a window dropped for out of memory leaves no scaler state behind.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = FailsAbove(limit=3)
    reference = make_model()
    x, y = torch.randn(12, 8), torch.randn(12, 4)
    plan = BatchPlan(global_batch_size=12, micro_batch_size=6, world_size=1)
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), plan, auto_micro_batch=True, grad_scaler=scaler
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the retries warn
        for micro_x, micro_y in acc.split((x, y)):
            with acc.micro_step():
                acc.backward(loss_fn(model(micro_x), micro_y))
    assert acc.micro_batch_retries == 2 and acc.skipped_steps == 0
    assert scaler.get_scale() == 2.0**10  # no overflow was recorded; growth needs 2000 good steps
    assert_one_real_step(model.inner, reference, x, y)


def test_a_window_left_by_an_exception_is_skipped_and_the_next_split_goes_on():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(
        model, optimizer, BatchPlan(global_batch_size=8, micro_batch_size=2, world_size=1), auto_micro_batch=True
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="bad sample"):
        for index, micro in enumerate(acc.split(torch.randn(8, 8))):
            with acc.micro_step():
                if index == 1:
                    raise ValueError("bad sample")
                acc.backward(model(micro).square().mean())
    for micro in acc.split(torch.randn(8, 8)):  # the open, discarded window closes first: skipped, no step
        with acc.micro_step():
            acc.backward(model(micro).square().mean())
    assert acc.optimizer_steps == 2 and acc.skipped_steps == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # the second stepped
