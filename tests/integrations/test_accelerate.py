"""Accelerate: the Accumulator on `accelerator.prepare` objects scales, steps and schedules once; the traps refuse."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import max_relative_error
from tests.helpers.examples import (
    EXAMPLES,
    GLOBAL_BATCH,
    LR,
    MICRO_BATCH,
    SIZES,
    STEPS,
    TOLERANCE,
    assert_matches_reference,
    load_task,
    reference_weights,
)
from tests.helpers.launchers import ROOT, free_port, launch, user_env


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    # Accelerate keeps process-wide singletons (AcceleratorState, GradientState): each test starts from none.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(acc: Accumulator, model: torch.nn.Module, steps: int = STEPS) -> dict[str, torch.Tensor]:
    task = load_task()
    for step in range(steps):
        for inputs, targets in task.micro_batches(step, GLOBAL_BATCH, MICRO_BATCH, 0, 1):
            with acc.micro_step():
                acc.backward(task.loss_fn(model(inputs), targets))
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_prepared_objects_step_and_schedule_once_per_window() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = load_task().make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    model, prepared_optimizer, prepared_scheduler = accelerator.prepare(model, optimizer, scheduler)
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    acc = Accumulator(model, prepared_optimizer, plan, scheduler=prepared_scheduler)
    # Driven through what Accelerate wraps: no GradientState gate on the step, no num_processes-fold schedule.
    assert acc.optimizer is optimizer and acc.scheduler is scheduler and acc.backend == "plain"
    weights = train(acc, model)
    assert acc.optimizer_steps == STEPS and scheduler.last_epoch == STEPS
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.9**STEPS, rel=1e-12)
    assert max_relative_error(weights, reference_weights(STEPS, lr_decay=0.9)) <= TOLERANCE


def test_accelerate_gradient_accumulation_steps_is_refused_with_the_fix() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = load_task().make_model(0)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    with pytest.raises(
        ValueError,
        match=r"Accelerator\(gradient_accumulation_steps=4\) is set, and the Accumulator accumulates as well.*"
        r"build Accelerator\(\) without gradient_accumulation_steps \(or with 1\)",
    ):
        Accumulator(model, optimizer, plan)


def test_accelerate_fp16_scaler_is_adopted_and_unscaled_once() -> None:
    # On CPU Accelerator(mixed_precision="fp16") makes no scaler, so the AcceleratedOptimizer is built as
    # prepare() builds it under fp16: around the torch optimizer, with a GradScaler. A second unscale (the step
    # going through AcceleratedOptimizer.step after ours) would divide every update by 2**10.
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = load_task().make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    wrapped = AcceleratedOptimizer(optimizer, scaler=scaler)
    plan = BatchPlan(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)
    with pytest.raises(ValueError, match=r"two scalers would scale the loss twice\. Drop grad_scaler"):
        Accumulator(model, wrapped, plan, grad_scaler=torch.amp.GradScaler("cpu"))
    acc = Accumulator(model, wrapped, plan)
    assert acc.grad_scaler is scaler and acc.optimizer is optimizer
    weights = train(acc, model)
    assert scaler._get_growth_tracker() == STEPS and scaler.get_scale() == 2.0**10  # used once per step
    assert max_relative_error(weights, reference_weights(STEPS)) <= TOLERANCE


def test_import_of_integrations_and_checkpoint_stays_light() -> None:
    code = (
        "import sys, distaccum, distaccum.integrations, distaccum.checkpoint, distaccum.tools.envcheck;"
        "heavy = [m for m in ('accelerate', 'deepspeed') if m in sys.modules]; assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_prepared_model_on_two_ranks_equals_real_batch(tmp_path: Path) -> None:
    # launch/accelerate.sh on a machine without GPU: multi_cpu.yaml + ACCELERATE_USE_CPU=1, 2 gloo ranks, DDP.
    # The prepared ExponentialLR must decay once per optimizer step (Accelerate's wrapper would step it twice).
    path = tmp_path / "weights.pt"
    env = user_env(MAIN_PROCESS_PORT=str(free_port()))
    if torch.cuda.is_available():
        env.update(CONFIG=str(ROOT / "launch" / "accelerate" / "multi_cpu.yaml"), ACCELERATE_USE_CPU="1")
    output = launch(["bash", ROOT / "launch" / "accelerate.sh", *SIZES, "--steps", str(STEPS), "--save", path], env)
    assert "accum_steps 2 x micro_batch_size 8 x world_size 2" in output
    assert "distributed_type=DistributedType.MULTI_CPU backend=ddp" in output
    assert_matches_reference(path, reference_weights(STEPS, lr_decay=0.9))


@pytest.mark.slow
def test_multi_gpu_launch_on_cpu_without_use_cpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("the trap exists only on machines without CUDA: there --multi_gpu really wraps the model")
    # PLATFORM-NOTES: Accelerate reports DistributedType.NO and leaves the model unwrapped on 2 processes.
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    output = launch([*command, EXAMPLES / "accelerate_train.py", *SIZES, "--steps", "1"], expect_success=False)
    assert "model is a plain Sequential but world_size is 2" in output
    assert "set ACCELERATE_USE_CPU=1 so that Accelerate wraps the model" in output
    assert "step    1/1" not in output  # refused before training, not after
