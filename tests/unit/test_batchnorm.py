"""BatchNorm under accumulation: a warning by default, and running statistics equal to the real batch's with
``batch_norm="exact"``. BatchNorm is the first layer here, so its statistics depend on the data alone and the
real-batch reference is exact even though per-micro-batch normalization changes the gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from tests.helpers.hardware import hardware_params
from tests.helpers.spawn import run_ranks

MICRO, ACCUM, STEPS, FEATURES = 4, 4, 3, 6


def bn_model(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(norm, nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 2))


def data(image: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    shape = (STEPS, ACCUM * MICRO, FEATURES, 5, 5) if image else (STEPS, ACCUM * MICRO, FEATURES)
    return torch.randn(*shape, generator=generator) * 3 + 1


def image_model(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(norm, nn.Conv2d(FEATURES, 2, 3), nn.Flatten(), nn.Linear(18, 2))


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return output.square().mean()


def real_batch_statistics(norm: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The BatchNorm layer alone, one train-mode forward per real batch, not through distaccum."""
    norm.train()
    for step in range(STEPS):
        norm(inputs[step])
    return {k: v.clone() for k, v in norm.state_dict().items() if k.startswith(("running", "num_batches"))}


def accumulated_statistics(model: nn.Module, inputs: torch.Tensor, mode: str) -> tuple[dict, Accumulator]:
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        BatchPlan(accum_steps=ACCUM, micro_batch_size=MICRO),
        batch_norm=mode,
    )
    norm = model[0]
    for step in range(STEPS):
        start = norm.running_mean.clone()
        for index, x in enumerate(inputs[step].split(MICRO)):
            with acc.micro_step():
                acc.backward(loss_of(model(x)))
            if mode == "exact" and index < ACCUM - 1:  # inside the window the buffers stay as they were
                assert torch.equal(norm.running_mean, start)
    return {k: v.clone() for k, v in norm.state_dict().items() if k.startswith(("running", "num_batches"))}, acc


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("image", [False, True], ids=["BatchNorm1d", "BatchNorm2d"])
def test_exact_running_statistics_equal_the_real_batch(momentum, image):
    norm_type = nn.BatchNorm2d if image else nn.BatchNorm1d
    inputs = data(image)
    build = image_model if image else bn_model
    expected = real_batch_statistics(norm_type(FEATURES, momentum=momentum), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "exact" does not warn
        actual, _ = accumulated_statistics(build(norm_type(FEATURES, momentum=momentum)), inputs, "exact")
    assert int(actual["num_batches_tracked"]) == STEPS  # once per optimizer step
    for name in ("running_mean", "running_var"):
        error = float((actual[name] - expected[name]).norm() / expected[name].norm())
        assert error <= 1e-6, (name, error)


def test_per_micro_batch_statistics_differ_from_the_real_batch_and_warn_by_default():
    inputs = data(False)
    expected = real_batch_statistics(nn.BatchNorm1d(FEATURES), inputs)
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer.*updated 4 times per optimizer step.*batch_norm='exact'"):
        actual, _ = accumulated_statistics(bn_model(nn.BatchNorm1d(FEATURES)), inputs, "warn")
    assert int(actual["num_batches_tracked"]) == STEPS * ACCUM
    assert float((actual["running_var"] - expected["running_var"]).norm() / expected["running_var"].norm()) > 1e-2


def test_no_warning_when_chosen_or_when_nothing_accumulates():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = bn_model(nn.BatchNorm1d(FEATURES))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO), batch_norm="per_micro_batch")
        Accumulator(model, optimizer, BatchPlan(accum_steps=1, micro_batch_size=MICRO))
    with pytest.raises(ValueError, match=r"batch_norm must be 'warn', 'exact' or 'per_micro_batch', got 'sync'"):
        Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO), batch_norm="sync")


def test_a_discarded_window_leaves_the_statistics_untouched():
    model = bn_model(nn.BatchNorm1d(FEATURES))
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        BatchPlan(accum_steps=2, micro_batch_size=MICRO),
        batch_norm="exact",
    )
    before = {k: v.clone() for k, v in model[0].state_dict().items()}
    for x in data(False)[0].split(MICRO)[:2]:
        with acc.micro_step():
            acc.backward(loss_of(model(x)))
            acc.discard_window()
    assert acc.last_step.skipped
    assert all(torch.equal(v, before[k]) for k, v in model[0].state_dict().items())


def pooled_over_ranks(rank: int, world_size: int, device: str) -> dict:
    # On CUDA a real SyncBatchNorm (both ranks may share one GPU: gloo reduces CUDA tensors). SyncBatchNorm cannot run
    # on CPU; there the pooling it selects is forced on a plain BatchNorm (dispatch only). Either way the window's
    # statistics go through the real boundary all-reduce of 2 gloo ranks.
    where = torch.device("cuda", rank % torch.cuda.device_count()) if device == "cuda" else torch.device("cpu")
    norm = nn.SyncBatchNorm(FEATURES) if device == "cuda" else nn.BatchNorm1d(FEATURES)
    ids = [where.index] if device == "cuda" else None
    model = nn.parallel.DistributedDataParallel(bn_model(norm).to(where), device_ids=ids)
    plan = BatchPlan(global_batch_size=ACCUM * MICRO, micro_batch_size=MICRO)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, batch_norm="exact")
    if device == "cpu":
        acc._window.batch_norm.synced = [True]
    assert acc._window.batch_norm.synced == [True]
    inputs = data(False)
    per_rank = ACCUM * MICRO // world_size
    for step in range(STEPS):
        for x in inputs[step][rank * per_rank : (rank + 1) * per_rank].split(MICRO):
            with acc.micro_step():
                acc.backward(loss_of(model(x.to(where))))
    norm = model.module[0]
    return {
        "mean": norm.running_mean.cpu(),
        "var": norm.running_var.cpu(),
        "tracked": int(norm.num_batches_tracked),
    }


@pytest.mark.parametrize("device", hardware_params())
def test_synchronized_statistics_pool_the_window_over_all_ranks(device):
    results = run_ranks(pooled_over_ranks, device)
    expected = real_batch_statistics(nn.BatchNorm1d(FEATURES), data(False))
    for result in results:
        assert result["tracked"] == STEPS
        for name, key in (("running_mean", "mean"), ("running_var", "var")):
            error = float((result[key] - expected[name]).norm() / expected[name].norm())
            print(f"{device}: {name} relative error {error:.1e}")
            assert error <= 1e-6, (name, error)


def test_a_second_exact_accumulator_on_the_same_model_replaces_the_first():
    # A notebook cell run twice, or an accumulator rebuilt after a failed start: one set of hooks, not two
    # (two would each swap the buffers for copies, and the second restore would leave a copy in place).
    inputs = data(False)
    model = bn_model(nn.BatchNorm1d(FEATURES))
    buffer = model[0].running_mean  # DDP broadcasts the module's buffers by these objects
    Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        BatchPlan(accum_steps=2, micro_batch_size=MICRO),
        batch_norm="exact",
    )
    actual, _ = accumulated_statistics(model, inputs, "exact")
    assert model[0].running_mean is buffer
    expected = real_batch_statistics(nn.BatchNorm1d(FEATURES), inputs)
    assert int(actual["num_batches_tracked"]) == STEPS
    for name in ("running_mean", "running_var"):
        assert float((actual[name] - expected[name]).norm() / expected[name].norm()) <= 1e-6, name


def test_rebuilding_without_exact_statistics_removes_the_exact_hooks():
    inputs = data(False)
    model = bn_model(nn.BatchNorm1d(FEATURES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO), batch_norm="exact")
    actual, _ = accumulated_statistics(model, inputs, "per_micro_batch")
    assert int(actual["num_batches_tracked"]) == STEPS * ACCUM  # torch's own updates, not frozen buffers


@pytest.mark.parametrize("through", ["state_dict", "checkpoint"])
def test_a_mid_window_checkpoint_keeps_the_windows_statistics(through, tmp_path):
    from distaccum import checkpoint

    inputs = data(False)
    expected = real_batch_statistics(nn.BatchNorm1d(FEATURES), inputs)

    def build():
        model = bn_model(nn.BatchNorm1d(FEATURES))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = Accumulator(model, optimizer, BatchPlan(accum_steps=ACCUM, micro_batch_size=MICRO), batch_norm="exact")
        return model, optimizer, acc

    def train(model, acc, micro_batches):
        for x in micro_batches:
            with acc.micro_step():
                acc.backward(loss_of(model(x)))

    micro_batches = [x for step in range(STEPS) for x in inputs[step].split(MICRO)]
    stop = ACCUM + 2  # mid-window: the second window has seen 2 of its 4 micro-batches
    model, optimizer, acc = build()
    train(model, acc, micro_batches[:stop])
    if through == "checkpoint":
        checkpoint.save(tmp_path, model=model, optimizer=optimizer, accumulator=acc, include_grads=True)
    else:
        saved = {"model": model.state_dict(), "accumulator": acc.state_dict(include_grads=True)}
        assert len(saved["accumulator"]["window_batch_norm"][0]) == 1 + 2 * FEATURES
    model, optimizer, acc = build()  # a new process: new layers, an empty window
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is lost, nothing to warn about
        if through == "checkpoint":
            checkpoint.load(tmp_path, model=model, optimizer=optimizer, accumulator=acc)
        else:
            model.load_state_dict(saved["model"])
            acc.load_state_dict(saved["accumulator"])
    train(model, acc, micro_batches[stop:])
    actual = {k: v for k, v in model[0].state_dict().items() if k.startswith(("running", "num_batches"))}
    assert int(actual["num_batches_tracked"]) == STEPS
    for name in ("running_mean", "running_var"):
        assert float((actual[name] - expected[name]).norm() / expected[name].norm()) <= 1e-6, name


def test_an_old_mid_window_state_without_the_statistics_says_what_is_lost():
    model = bn_model(nn.BatchNorm1d(FEATURES))
    plan = BatchPlan(accum_steps=ACCUM, micro_batch_size=MICRO)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, batch_norm="exact")
    with acc.micro_step():
        acc.backward(loss_of(model(data(False)[0][:MICRO])))
    state = acc.state_dict(include_grads=True)
    del state["window_batch_norm"]
    fresh = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, batch_norm="exact")
    with pytest.warns(UserWarning, match="without the window's BatchNorm statistics"):
        fresh.load_state_dict(state)
    other = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    state = acc.state_dict(include_grads=True)
    state["grads"] = [torch.zeros_like(p) for p in other.parameters()]
    wrong = Accumulator(other, torch.optim.SGD(other.parameters(), lr=0.1), plan, batch_norm="exact")
    with pytest.raises(ValueError, match="BatchNorm statistics are for other layers"):
        wrong.load_state_dict(state)
