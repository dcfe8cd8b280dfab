"""Options that each held on their own line and broke together (issue 24), on 2 real gloo ranks: a float64 default
dtype under DDP, FSDP2 with a parameter of fewer rows than ranks, bf16 summed in bf16 where grad_sync reduces in
every micro-step, ranks built with different options or optimizer settings, an optimizer holding parameters the
wrapper never averages. The per-rank bodies live here (spawn imports this module)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import (
    loss_fn,
    make_data,
    make_model,
    make_optimizer,
    max_relative_error,
    rank_micro_batches,
    reference_run,
)
from tests.helpers.spawn import run_ranks
from tests.helpers.wrappers import full_state, wrap

MICRO = 4
ACCUM = 2
STEPS = 3


def _train(acc: Accumulator, model: nn.Module, rank: int, world_size: int, dtype: torch.dtype) -> None:
    inputs, targets = make_data(STEPS, MICRO * ACCUM * world_size, dtype)
    for step in range(STEPS):
        for x, y in rank_micro_batches(inputs[step], targets[step], rank, world_size, MICRO):
            with acc.micro_step():
                acc.backward(loss_fn(model(x), y), num_items=MICRO)  # equal counts: the real batch's mean


def float64_by_default(rank: int, world_size: int, backend: str) -> dict[str, torch.Tensor]:
    torch.set_default_dtype(torch.float64)
    model = wrap(make_model(torch.float64), backend, world_size)
    acc = Accumulator(
        model, make_optimizer("adam", model.parameters()), BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM)
    )
    _train(acc, model, rank, world_size, torch.float64)
    return full_state(model)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_a_float64_default_dtype_equals_the_real_batch(backend):
    # Row 1: the DDP comm hook's found_inf flag took the default dtype, and GradScaler's kernel takes float32 only.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        expected, _ = reference_run("adam", STEPS, MICRO * ACCUM * 2, torch.float64)
    finally:
        torch.set_default_dtype(previous)
    for weights in run_ranks(float64_by_default, backend, timeout_s=120):
        assert max_relative_error(weights, expected) < 1e-12


def _one_row_head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))  # the head's bias: 1 row, 2 ranks


def one_row_bias(rank: int, world_size: int, clip: float | None) -> dict[str, torch.Tensor]:
    model = wrap(_one_row_head().double(), "fsdp2", world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, optimizer, BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM), max_grad_norm=clip)
    inputs, targets = _one_row_data(world_size)
    for step in range(STEPS):
        for x, y in rank_micro_batches(inputs[step], targets[step], rank, world_size, MICRO):
            with acc.micro_step():
                acc.backward(nn.functional.mse_loss(model(x), y))
    return full_state(model)


def _one_row_data(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    samples = MICRO * ACCUM * world_size
    return (
        torch.randn(STEPS, samples, 8, generator=generator, dtype=torch.float64),
        torch.randn(STEPS, samples, 1, generator=generator, dtype=torch.float64),
    )


def _one_row_reference(clip: float | None) -> dict[str, torch.Tensor]:
    model = _one_row_head().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = _one_row_data(2)
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[step]), targets[step]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clipping", "clipping"])
def test_fsdp2_with_a_parameter_of_fewer_rows_than_ranks_equals_the_real_batch(clip):
    # Row 2: without clipping the rank holding an empty shard raised in torch's infinity norm, its peer hung.
    expected = _one_row_reference(clip)
    for weights in run_ranks(one_row_bias, clip, timeout_s=120):
        assert max_relative_error(weights, expected) < 1e-12


SUMMED_IN_EVERY_BACKWARD = [("ddp", "every"), ("fsdp1", "every"), ("fsdp1", "sharded"), ("fsdp2", "every")]
SUMMED_IN_EVERY_BACKWARD += [("fsdp2", "sharded")]


def bf16_warnings(rank: int, world_size: int) -> list[list[str]]:
    seen = []
    for backend, grad_sync in SUMMED_IN_EVERY_BACKWARD:
        model = wrap(make_model(torch.bfloat16), backend, world_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Accumulator(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                BatchPlan(micro_batch_size=MICRO, accum_steps=4),
                grad_sync=grad_sync,
            )
        seen.append([str(warning.message) for warning in caught])
    return seen


def test_bf16_summed_in_every_backward_is_warned_with_the_fix():
    # Row 7: accumulate_dtype="auto" was set to None before the check that warns, so bf16 sums went unsaid.
    for ranks in run_ranks(bf16_warnings, timeout_s=120):
        for (backend, grad_sync), messages in zip(SUMMED_IN_EVERY_BACKWARD, ranks, strict=True):
            said = [m for m in messages if "summed over the 4 micro-steps of a window in bfloat16" in m]
            assert len(said) == 1, (backend, grad_sync, messages)
            assert f"grad_sync={grad_sync!r} reduces the gradients in every micro-step's backward" in said[0]
            assert "grad_sync='boundary'" in said[0]


DIFFERENT = {
    "max_grad_norm": ({"max_grad_norm": 1.0}, "max_grad_norm=1.0 where rank 0 has None"),
    "on_nonfinite": ({"on_nonfinite": "raise"}, "on_nonfinite='raise' where rank 0 has 'skip'"),
    "grad_sync": ({"grad_sync": "every"}, "grad_sync='every' where rank 0 has 'boundary'"),
    "accumulate_dtype": ({"accumulate_dtype": None}, "accumulate_dtype=None where rank 0 has 'auto'"),
    "lr": ({"lr": 0.2}, "param_groups[0].lr=0.2 where rank 0 has 0.1"),
    "param_groups": ({"groups": 2}, "param_groups[0].params=2 where rank 0 has 6"),
}


def built_differently(rank: int, world_size: int) -> dict[str, str]:
    said = {}
    for case, (options, _) in DIFFERENT.items():
        options = dict(options) if rank == 1 else {}
        model = wrap(make_model(), "ddp", world_size)
        params = list(model.parameters())
        lr = options.pop("lr", 0.1)
        groups = (
            [{"params": params[:2]}, {"params": params[2:]}] if options.pop("groups", 1) == 2 else [{"params": params}]
        )
        plan = BatchPlan(micro_batch_size=MICRO, accum_steps=2)
        acc = Accumulator(model, torch.optim.SGD(groups, lr=lr), plan, **options)
        x, y = make_data(1, MICRO)
        said[case] = "no error"
        try:
            with acc.micro_step():
                acc.backward(loss_fn(model(x[0]), y[0]))
        except RuntimeError as error:
            said[case] = str(error)
    return said


def test_ranks_built_with_different_options_fail_on_every_rank_before_any_work():
    # Built differently, the replicas drifted apart (2.1e-1) and the run completed without a word.
    for messages in run_ranks(built_differently, timeout_s=120):
        for case, (_, said) in DIFFERENT.items():
            message = messages[case]
            assert message.startswith("ranks disagree on the accumulation plan, their position in the window, or"), case
            assert f"rank 1 has {said}" in message, (case, message)


def optimizer_outside_the_wrapper(rank: int, world_size: int) -> str:
    model = wrap(make_model(), "ddp", world_size)
    temperature = nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    try:
        Accumulator(model, optimizer, BatchPlan(micro_batch_size=MICRO, accum_steps=2))
    except ValueError as error:
        return str(error)
    return "no error"


def test_an_optimizer_parameter_outside_the_wrapped_model_is_refused_on_several_ranks():
    for message in run_ranks(optimizer_outside_the_wrapper, timeout_s=60):
        assert "optimizer holds 1 parameter(s) that are not in the wrapped model" in message
        assert "never averages their gradients over the 2 ranks" in message


class Boom(Exception):
    pass


def raises_before_backward(rank: int, world_size: int, when: str, grad_sync: str, buffers: bool) -> dict:
    """3 windows of 2 micro-steps on DDP; rank 1's block raises before acc.backward in window 2's boundary (or, under
    grad_sync="every", its first micro-step), before or after its forward; the loop catches it and goes on."""
    torch.manual_seed(0)
    model = make_model()
    if buffers:  # DDP broadcasts buffers in every synced forward: a forward that did not run must join that too
        model.register_buffer("count", torch.zeros(1))
    model = wrap(model, "ddp", world_size)
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM)
    acc = Accumulator(model, make_optimizer("sgd", model.parameters()), plan, grad_sync=grad_sync)
    inputs, targets = make_data(STEPS, MICRO * ACCUM * world_size)
    failing = (1, 0 if grad_sync == "every" else ACCUM - 1)
    raised = 0
    for step in range(STEPS):
        for index, (x, y) in enumerate(rank_micro_batches(inputs[step], targets[step], rank, world_size, MICRO)):
            try:
                with acc.micro_step():
                    fails = rank == 1 and (step, index) == failing
                    if fails and when == "before-forward":
                        raise Boom
                    output = model(x)
                    if fails:
                        raise Boom
                    acc.backward(loss_fn(output, y))
            except Boom:
                raised += 1
    return {"weights": full_state(model), "skipped": acc.skipped_steps, "steps": acc.optimizer_steps, "raised": raised}


def _reference_without(window: int) -> dict[str, torch.Tensor]:
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    inputs, targets = make_data(STEPS, MICRO * ACCUM * 2)
    for step in range(STEPS):
        if step != window:
            optimizer.zero_grad()
            loss_fn(model(inputs[step]), targets[step]).backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize(
    ("when", "grad_sync", "buffers"),
    [
        ("before-forward", "boundary", False),
        ("before-forward", "boundary", True),
        ("after-forward", "boundary", False),
        ("after-forward", "every", False),
    ],
    ids=["before-forward", "before-forward-buffers", "after-forward", "every"],
)
def test_a_rank_that_raises_before_its_reducing_backward_does_not_hang_its_peer(when, grad_sync, buffers):
    # Its peer waited in DDP's bucket all-reduce until the process group's timeout (600 s by default). Now the
    # failing rank joins that reduction with zeros and the window is discarded on every rank.
    expected = _reference_without(1)
    for result in run_ranks(raises_before_backward, when, grad_sync, buffers, timeout_s=90):
        assert (result["steps"], result["skipped"]) == (STEPS, 1)
        weights = {k: v for k, v in result["weights"].items() if not k.endswith("count")}
        assert max_relative_error(weights, expected) < 1e-6


class WithBranch(nn.Module):
    """A trunk, and a branch used only when asked (a head that no window has used yet)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(8, 4)
        self.branch = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        return self.trunk(x) + self.branch(x) if use_branch else self.trunk(x)


def save_with_a_stateless_parameter(rank: int, world_size: int, directory: str) -> str:
    from distaccum import checkpoint

    model = wrap(WithBranch(), "fsdp2", world_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = Accumulator(model, optimizer, BatchPlan(micro_batch_size=MICRO, accum_steps=2))
    inputs, targets = make_data(1, MICRO * 2 * world_size)
    for x, y in rank_micro_batches(inputs[0], targets[0], rank, world_size, MICRO):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    try:
        checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc)
    except ValueError as error:
        return str(error)
    return "saved"


def test_a_sharded_save_that_torch_would_restore_with_a_made_up_step_is_refused_on_every_rank(tmp_path):
    # The combinations harness found it: torch.distributed.checkpoint initializes a parameter without optimizer
    # state with a zero-gradient step at load (FSDP1: 7.7e-2 off, silently; FSDP2: a missing key inside dcp.load).
    for message in run_ranks(save_with_a_stateless_parameter, str(tmp_path), timeout_s=90):
        assert message.startswith("checkpoint.save of the sharded FSDPWithBranch: the optimizer holds state for 2")
        assert "have had no gradient in any step yet" in message


def scheduler_stepped_on_one_rank(rank: int, world_size: int) -> dict:
    model = wrap(make_model(), "ddp", world_size)
    optimizer = make_optimizer("sgd", model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = Accumulator(model, optimizer, BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM), scheduler=scheduler)
    inputs, targets = make_data(STEPS, MICRO * ACCUM * world_size)
    errors = []
    for step in range(STEPS):
        for index, (x, y) in enumerate(rank_micro_batches(inputs[step], targets[step], rank, world_size, MICRO)):
            if rank == 1 and (step, index) == (1, 0):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's "lr_scheduler.step() before optimizer.step()"
                    scheduler.step()  # the loop steps it too, on one rank
            try:
                with acc.micro_step():
                    acc.backward(loss_fn(model(x), y))
            except RuntimeError as error:
                errors.append(str(error))
    return {"errors": errors, "steps": acc.optimizer_steps, "skipped": acc.skipped_steps}


def test_a_scheduler_stepped_by_one_ranks_loop_is_named_there_without_hanging_the_other():
    # The check runs before the boundary's reducing backward, so the rank that raises joins that reduction.
    ranks = run_ranks(scheduler_stepped_on_one_rank, timeout_s=90)
    assert ranks[0]["errors"] == []
    assert len(ranks[1]["errors"]) == 1 and "stepped outside it" in ranks[1]["errors"][0]
    for result in ranks:
        assert (result["steps"], result["skipped"]) == (STEPS, 1)
