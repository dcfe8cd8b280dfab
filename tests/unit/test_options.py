"""Every Accumulator option is checked at construction, in one place (:mod:`distaccum.options`), before anything
is set or attached: a refused construction leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan


def _model_and_optimizer(*layers: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 4), *layers, nn.Linear(4, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("name", ["check_ranks", "auto_micro_batch", "report_grad_norm"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_an_on_off_option_that_is_not_a_bool_is_refused_by_name(name: str, value: object) -> None:
    # "false" is truthy: it switched the option on without a word.
    model, optimizer = _model_and_optimizer()
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got {value!r}"):
        Accumulator(model, optimizer, BatchPlan(micro_batch_size=2, accum_steps=2), **{name: value})


@pytest.mark.parametrize("value", ["0.9", True, 1.0, -0.1])
def test_a_noise_scale_that_is_not_a_decay_is_refused_by_name(value: object) -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match=r"noise_scale must be an EMA decay in \[0, 1\), got"):
        Accumulator(model, optimizer, BatchPlan(micro_batch_size=2, accum_steps=2), noise_scale=value)


def test_a_refused_construction_attaches_no_batch_norm_hooks() -> None:
    # batch_norm="exact" hooks every BatchNorm layer; auto_micro_batch then refused SyncBatchNorm, and the hooks
    # stayed on the model, swapping its running statistics for copies nothing applied in every later forward.
    model, optimizer = _model_and_optimizer(nn.SyncBatchNorm(4))
    layer = model[1]
    with pytest.raises(ValueError, match="SyncBatchNorm all-gathers statistics"):
        Accumulator(
            model,
            optimizer,
            BatchPlan(micro_batch_size=2, accum_steps=2),
            batch_norm="exact",
            auto_micro_batch=True,
        )
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_options_are_checked_before_the_model_is_looked_at() -> None:
    # A bad value is named first, even where the model's wrapper would refuse something else too.
    model, optimizer = _model_and_optimizer(nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match="batch_norm must be 'warn', 'exact' or 'per_micro_batch'"):
        Accumulator(
            model,
            optimizer,
            BatchPlan(micro_batch_size=2, accum_steps=2),
            batch_norm="sometimes",
            auto_micro_batch=True,
        )
