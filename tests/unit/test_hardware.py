"""One body per behaviour, parametrized over hardware: CPU always, CUDA where a GPU exists (skipped elsewhere)."""

from __future__ import annotations

import warnings

import pytest
import torch

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer, max_relative_error, reference_run
from tests.helpers.hardware import hardware_params, requires_cuda

MICRO, ACCUM, STEPS = 4, 4, 3
BF16_TOLERANCE = 5e-3  # measured on CPU: bf16 rounding 4.6e-4 (micro-batches vs one batch); a gradient 10% off: 2.1e-2


@pytest.mark.parametrize("device", hardware_params())
def test_virtual_batch_matches_real_batch_on_device(device):
    model = make_model().to(device)
    acc = Accumulator(
        model,
        make_optimizer("adam", model.parameters()),
        BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM, world_size=1),
    )
    inputs, targets = make_data(STEPS, MICRO * ACCUM)
    for step in range(STEPS):
        for x, y in zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True):
            with acc.micro_step():
                acc.backward(loss_fn(model(x.to(device)), y.to(device)))
    expected, _ = reference_run("adam", STEPS, MICRO * ACCUM)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    assert max_relative_error(state, expected) <= (1e-6 if device == "cpu" else 1e-5)


def autocast_real_batch(
    device: str, inputs: torch.Tensor, targets: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float16
) -> dict:
    """The same autocast on the real batch, on the same device, not through distaccum."""
    model = make_model().to(device)
    optimizer = make_optimizer("sgd", model.parameters())
    for step in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype):
            output = model(inputs[step].to(device)).float()
        (loss_fn(output, targets[step].to(device)) * scale).backward()
        optimizer.step()
    return {k: v.float().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("device", hardware_params())
def test_fp16_autocast_with_grad_scaler_on_device(device):
    model = make_model().to(device)
    scaler = torch.amp.GradScaler(device)
    acc = Accumulator(
        model,
        make_optimizer("sgd", model.parameters()),
        BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM, world_size=1),
        grad_scaler=scaler,
    )
    inputs, targets = make_data(STEPS, MICRO * ACCUM)
    for step in range(STEPS):
        for x, y in zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True):
            with acc.micro_step(), torch.autocast(device, dtype=torch.float16):
                acc.backward(loss_fn(model(x.to(device)).float(), y.to(device)))
    assert acc.optimizer_steps == STEPS
    assert acc.skipped_steps == 0
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    # Measured on CPU: fp16 rounding 3.9e-5 (micro-batches vs one batch); a gradient 10% off: 2.1e-2.
    expected = autocast_real_batch(device, inputs, targets)
    assert max_relative_error(state, expected) < 5e-3
    assert max_relative_error(autocast_real_batch(device, inputs, targets, scale=1.1), expected) > 5e-3


@pytest.mark.parametrize("device", hardware_params())
def test_bf16_autocast_on_device(device):
    # bf16 needs no loss scaling: the window's factor and the step run on the float32 gradients autocast leaves.
    model = make_model().to(device)
    acc = Accumulator(
        model,
        make_optimizer("sgd", model.parameters()),
        BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM, world_size=1),
    )
    inputs, targets = make_data(STEPS, MICRO * ACCUM)
    for step in range(STEPS):
        for x, y in zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True):
            with acc.micro_step(), torch.autocast(device, dtype=torch.bfloat16):
                acc.backward(loss_fn(model(x.to(device)).float(), y.to(device)))
    assert acc.optimizer_steps == STEPS
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    expected = autocast_real_batch(device, inputs, targets, dtype=torch.bfloat16)
    error = max_relative_error(state, expected)
    wrong = max_relative_error(autocast_real_batch(device, inputs, targets, scale=1.1, dtype=torch.bfloat16), expected)
    print(f"bf16 autocast on {device}: virtual vs real batch {error:.1e}; a gradient 10% off {wrong:.1e}")
    assert error < BF16_TOLERANCE < wrong


@pytest.mark.cuda
@requires_cuda()
@pytest.mark.parametrize("clip", [None, 1.0])
def test_no_host_sync_inside_a_window_and_few_at_the_boundary(clip):
    # torch's sync debug mode warns at every host-device synchronization: a window's non-boundary micro-steps
    # make none (the loss is kept on the device, nothing is read), and the boundary only what its decisions read.
    model = make_model().to("cuda")
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(
        model, optimizer, BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM, world_size=1), max_grad_norm=clip
    )
    inputs, targets = make_data(STEPS, MICRO * ACCUM)
    batches = [
        (x.cuda(), y.cuda())
        for step in range(STEPS)
        for x, y in zip(inputs[step].split(MICRO), targets[step].split(MICRO), strict=True)
    ]
    syncs = {"inside": 0, "boundary": 0}
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for x, y in batches:
            boundary = acc.is_boundary
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with acc.micro_step():
                    acc.backward(loss_fn(model(x), y))
            syncs["boundary" if boundary else "inside"] += sum("synchroniz" in str(w.message) for w in seen)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    print(f"host syncs (clip={clip}): {syncs} over {STEPS} steps of {ACCUM} micro-steps")
    assert syncs["inside"] == 0
    # The boundary reads the window's scalars once: the loss sum, and the NaN/inf flag or (clipping) the norm, stay
    # on the GPU until then and are read with them.
    assert syncs["boundary"] <= STEPS
