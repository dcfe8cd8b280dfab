"""The combinatorial equivalence harness: the option space, a seeded sampler, an independent reference, the verdict.

distaccum's promise is "the virtual batch equals the real batch, or a clear refusal at construction". Each option
holds along its own line; this harness draws whole configurations (backend x dtype x optimizer x options) and holds
every one of them to that promise (issue 24, "A harness that finds the next ones"):

* :func:`sample` draws :class:`Config` values from a seeded ``random.Random``; :func:`script` turns one into the
  exact sequence of windows every rank runs (which data, where a window is cut short, where NaN is injected,
  where the run is checkpointed and resumed).
* :func:`reference` trains the same model on one process, one backward per real (global) batch, with the exact
  weighting written out by hand, clipping and scheduler once per step, skipped windows skipped. It never imports
  distaccum (``tests/unit/test_combinations.py`` pins that); the distaccum side lives in
  :mod:`tests.helpers.combination_workers`.
* :func:`judge` compares what distaccum did (final weights, every step's ``StepResult``) with the reference and
  returns a :class:`Verdict`: equal (fp32 1e-5, float64 1e-10, bf16 within 3x of the bf16 real batch's own
  distance from float64, plus a floor), or refused by ``Accumulator(...)`` with ``ValueError``/``TypeError``.
  Anything else (a mismatch, a refusal after the first micro-step, a crash inside torch) is a failure.

Combinations that torch itself breaks, without distaccum, are steered around in :func:`_repair`, each with the torch
behaviour named. Failures the harness found stay as fixed configurations in :data:`REGRESSIONS`; those still
failing on the current code are in :data:`KNOWN_FAILING` with their issue-24 row, and the sampler leaves their
pattern out (:func:`known_failure`) so that the sampled tests stay meaningful until the fix lands.

Weight errors are measured relative to what training changed (``||w - w_ref|| / ||w_ref - w_0||`` over all
tensors), so that a 1.001 scale on one micro-batch's loss (the mutation self-test) is far above the tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IN_FEATURES = 4
HIDDEN = 6
CLIP_VALUES = (None, 0.05, 10.0)  # 0.05 binds on every step (norms here are 0.3-3), 10.0 never does
MUTATION = 1.001  # the self-test's scale on one micro-batch's loss

BACKENDS = {1: ("plain",), 2: ("ddp", "fsdp1", "fsdp2")}
DTYPES = ("fp32", "double", "default64", "bf16")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
IMPLS = ("forloop", "foreach", "fused")
UNUSED = ("none", "some", "window")  # the branch: always used, used on alternate micro-batches, unused in window 0
ENDS = ("none", "flush", "last", "iterate")  # how the data ends: full windows, or a short window by ...
GRAD_SYNCS = (None, "boundary", "every", "sharded")
ACCUMULATE_DTYPES = ("auto", None, "float32")
SCHEDULERS = (None, "lambda", "step")
CHECKPOINTS = (None, "mid", "boundary")
SHARDED = ("fsdp1", "fsdp2")
FROZEN = (None, None, None, "trainable", "all")


@dataclass(frozen=True)
class Config:
    """One point of the option space (defaults: the simplest run)."""

    backend: str = "plain"
    dtype: str = "fp32"
    optimizer: str = "sgd"
    impl: str = "foreach"
    groups: bool = False  # two param groups (head and branch at half the lr)
    frozen: str | None = None  # a frozen layer (requires_grad=False): its params in the optimizer "all", or "trainable"
    unused: str = "none"
    out_features: int = 2  # 1: the head's bias has fewer rows than 2 ranks (an empty FSDP2 shard)
    accum_steps: int = 2
    micro_batch_size: int = 2
    full_windows: int = 2
    end: str = "none"
    short: int = 1  # micro-steps per rank of the short last window (end flush/last; iterate: the data's tail)
    uneven: bool = False  # flush: the last rank has one micro-step less; iterate: one micro-batch less of data
    items: bool = False  # acc.backward(loss, num_items=n) with a ragged item mask
    empty_micro_batch: bool = False  # with items: one micro-batch whose every item is ignored (num_items=0)
    max_grad_norm: float | None = None
    report_grad_norm: bool = False
    noise_scale: bool = False
    scheduler: str | None = None
    batch_schedule: bool = False  # BatchSchedule: accum_steps, then accum_steps + 1 after the first window
    grad_sync: str | None = None
    accumulate_dtype: str | None = "auto"
    nan: bool = False  # one micro-batch's loss is NaN: its window is skipped (on_nonfinite="skip")
    checkpoint: str | None = None  # "mid" / "boundary" of window 0: saved, loaded into fresh objects, resumed
    checkpoint_via: str = "memory"  # acc.state_dict(include_grads=True) and torch's state_dicts, or "files":
    # distaccum.checkpoint.save / load, or "signed-files": the same with key= (an HMAC-signed manifest)
    seed: int = 0

    def describe(self) -> str:
        """The fields that differ from the defaults, e.g. ``ddp/bf16/adam grad_sync=every``."""
        head = f"{self.backend}/{self.dtype}/{self.optimizer}-{self.impl}"
        rest = [
            f"{field.name}={getattr(self, field.name)}"
            for field in dataclasses.fields(self)
            if field.name not in ("backend", "dtype", "optimizer", "impl")
            and getattr(self, field.name) != field.default
        ]
        return " ".join([head, *rest])

    @property
    def exact(self) -> bool:
        """Whether the comparison is exact (fp32 / float64) rather than relative to the bf16 real batch."""
        return self.dtype != "bf16"


# --- the sampler -----------------------------------------------------------------------------------------------


def sample(count: int, seed: int, world_size: int) -> list[Config]:
    """``count`` configurations for ``world_size`` ranks, the same for the same seed; known-failing patterns and
    combinations torch itself breaks are steered around (:func:`_repair`, :func:`known_failure`)."""
    rng = random.Random(f"distaccum-combinations-{seed}-{world_size}")
    configs: list[Config] = []
    while len(configs) < count:
        config = _repair(_draw(rng, world_size), world_size)
        if known_failure(config, world_size) is None:
            configs.append(config)
    return configs


def _draw(rng: random.Random, world_size: int) -> Config:
    items = rng.random() < 0.5
    return Config(
        backend=rng.choice(BACKENDS[world_size]),
        dtype=rng.choice(DTYPES),
        optimizer=rng.choice(OPTIMIZERS),
        impl=rng.choice(IMPLS),
        groups=rng.random() < 0.3,
        frozen=rng.choice(FROZEN),
        unused=rng.choice(UNUSED),
        out_features=rng.choice((1, 2, 2)),
        accum_steps=rng.randint(1, 4),
        micro_batch_size=rng.choice((1, 2, 3)),
        full_windows=rng.randint(1, 3),
        end=rng.choice(ENDS),
        short=rng.randint(1, 3),
        uneven=rng.random() < 0.3,
        items=items,
        empty_micro_batch=items and rng.random() < 0.4,
        max_grad_norm=rng.choice(CLIP_VALUES),
        report_grad_norm=rng.random() < 0.3,
        noise_scale=rng.random() < 0.15,
        scheduler=rng.choice(SCHEDULERS),
        batch_schedule=rng.random() < 0.2,
        grad_sync=rng.choice(GRAD_SYNCS if world_size > 1 else GRAD_SYNCS[:3] + GRAD_SYNCS[:3] + GRAD_SYNCS),
        accumulate_dtype=rng.choice(ACCUMULATE_DTYPES),
        nan=rng.random() < 0.2,
        checkpoint=rng.choice(CHECKPOINTS),
        checkpoint_via=rng.choice(("memory", "files", "signed-files")),
        seed=rng.randrange(2**16),
    )


def _repair(config: Config, world_size: int) -> Config:
    """Steer a drawn configuration away from what torch breaks without distaccum, and from documented uses that
    distaccum refuses later than construction by design (each named in :func:`_repair_once`); everything else
    stays as drawn. Repeated until nothing changes: one repair can call for another."""
    while (repaired := _repair_once(config, world_size)) != config:
        config = repaired
    return config


def _repair_once(config: Config, world_size: int) -> Config:
    changes: dict[str, Any] = {}
    sharded = config.backend in SHARDED
    sync_in_backward = config.grad_sync in ("every", "sharded") and sharded
    if config.end == "flush" and sharded and not sync_in_backward:
        # Documented: FSDP keeps the window's gradients in private buffers that only a backward reduces, so
        # flush() refuses a pending window and names micro_step(last=True), which the harness then uses.
        changes["end"] = "last"
    if config.checkpoint == "mid" and (sharded or config.accum_steps < 2):
        # Documented: state_dict(include_grads=True) mid-window refuses on FSDP (private buffers); a window of one
        # micro-step has no middle.
        changes["checkpoint"] = "boundary"
    if config.unused == "window" and config.backend == "fsdp1" and config.optimizer != "sgd":
        # torch: FSDP1 gives a parameter unused by every rank in a backward a zero gradient, not None, so momentum,
        # Adam and weight decay move it where the real batch leaves it alone (no distaccum involved).
        changes["unused"] = "some"
    if config.impl == "fused" and config.optimizer in ("sgd", "momentum") and config.backend == "fsdp2":
        # torch: `_fused_sgd_` has no DTensor sharding strategy (fused SGD under FSDP2 fails in its first step).
        changes["impl"] = "foreach"
    if config.impl == "fused" and config.optimizer == "momentum" and config.unused != "none":
        # torch: fused momentum SGD raises TypeError ("expected Tensor as element 1 in argument 2, but got NoneType")
        # when a parameter gets its first gradient after the first step: the branch unused in window 0, or in the
        # first window that steps when an earlier one was skipped.
        changes["unused"] = "none"
    if config.uneven and not (config.end == "iterate" or (config.end == "flush" and config.backend == "ddp")):
        # Ranks whose windows differ in length: iterate() cuts them to what all have; flush() joins ranks at
        # different positions only where nothing reduces inside the window (DDP "boundary"; one process has no
        # other rank); micro_step(last=True) must be passed by all ranks together.
        changes["uneven"] = False
    if config.uneven and config.end == "flush" and config.grad_sync == "every":
        changes["uneven"] = False
    last_accum = _last_accum(config, world_size)
    if config.end in ("flush", "last") and last_accum == 1:
        changes["end"] = "none"  # a window of one micro-step cannot be cut short
    elif config.end in ("flush", "last") and config.short >= last_accum:
        changes["short"] = last_accum - 1
    if not config.items:
        changes["empty_micro_batch"] = False
    if config.checkpoint is None:
        changes["checkpoint_via"] = "memory"
    return dataclasses.replace(config, **changes) if changes else config


# --- what every rank runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One window: each rank's micro-batches (indices into that rank's data) and how the window ends."""

    micro: tuple[tuple[int, ...], ...]
    end: str  # "full" (the plan's boundary), "last" (micro_step(last=True)), "flush", "data" (iterate ran out)


@dataclass(frozen=True)
class Script:
    """Everything the distaccum loop and the reference must agree on, derived from a :class:`Config` alone."""

    windows: tuple[Window, ...]
    data_lengths: tuple[int, ...]  # micro-batches of data per rank (iterate: what the loop is given)
    nan: tuple[int, int] | None  # (rank, data index) whose loss is NaN
    mutation: tuple[int, int] | None  # (rank, data index) the self-test scales by MUTATION
    empty: tuple[int, int] | None  # (rank, data index) whose every item is ignored
    checkpoint_after: int | None  # micro-steps per rank after which the run is saved and resumed
    stages: tuple[tuple[int, int], ...] | None  # the BatchSchedule's (start samples, global batch) pairs


def stages(config: Config, world_size: int) -> tuple[tuple[int, int], ...] | None:
    """The BatchSchedule: ``accum_steps`` for the first window, one more from then on (None: a plain plan)."""
    if not config.batch_schedule:
        return None
    per_micro_step = config.micro_batch_size * world_size
    return (
        (0, config.accum_steps * per_micro_step),
        (config.accum_steps * per_micro_step, (config.accum_steps + 1) * per_micro_step),
    )


def _accum_at(config: Config, world_size: int, consumed: int) -> int:
    schedule = stages(config, world_size)
    if schedule is None:
        return config.accum_steps
    size = schedule[0][1]
    for start, stage_size in schedule:
        if consumed >= start:
            size = stage_size
    return size // (config.micro_batch_size * world_size)


def _window_lengths(config: Config, world_size: int) -> list[int]:
    """Per-rank lengths of the full windows, as the plan (or schedule) sets them; consumed counts all ranks."""
    lengths, consumed = [], 0
    for _ in range(config.full_windows):
        accum = _accum_at(config, world_size, consumed)
        lengths.append(accum)
        consumed += accum * world_size * config.micro_batch_size
    return lengths


def _last_accum(config: Config, world_size: int) -> int:
    lengths = _window_lengths(config, world_size)
    consumed = sum(lengths) * world_size * config.micro_batch_size
    return _accum_at(config, world_size, consumed)


def script(config: Config, world_size: int) -> Script:
    """The windows every rank runs, derived from ``config`` (the distaccum loop and the reference both read it)."""
    windows = _windows(config, world_size)
    if config.end == "iterate":
        total = sum(len(w.micro[0]) for w in windows[: config.full_windows]) + config.short
        lengths = tuple(total - (1 if config.uneven and r == world_size - 1 else 0) for r in range(world_size))
    else:
        lengths = tuple(sum(len(w.micro[r]) for w in windows) for r in range(world_size))
    rng = random.Random(f"script-{config.seed}")
    counted = _counted_micro_batches(windows, world_size)
    empty = None
    if config.empty_micro_batch:
        empty = counted[rng.randrange(len(counted))]
    candidates = [place for place in counted if place != empty]
    nan = candidates[rng.randrange(len(candidates))] if config.nan and candidates else None
    nan_window = None if nan is None else _window_of(windows, nan)
    # The mutation goes where it must show: a counted micro-batch of a window that steps.
    mutation = next((place for place in candidates if place != nan and _window_of(windows, place) != nan_window), None)
    checkpoint_after = None
    if config.checkpoint == "mid":
        checkpoint_after = len(windows[0].micro[0]) // 2
    elif config.checkpoint == "boundary" and len(windows) > 1:
        checkpoint_after = len(windows[0].micro[0])
    return Script(
        windows=tuple(windows),
        data_lengths=lengths,
        nan=nan,
        mutation=mutation,
        empty=empty,
        checkpoint_after=checkpoint_after,
        stages=stages(config, world_size),
    )


def _windows(config: Config, world_size: int) -> list[Window]:
    windows, start = [], 0
    for length in _window_lengths(config, world_size):
        windows.append(Window(tuple(tuple(range(start, start + length)) for _ in range(world_size)), "full"))
        start += length
    if config.end in ("flush", "last", "iterate"):
        short = [config.short] * world_size
        if config.uneven:
            short[-1] -= 1
        if config.end != "iterate":
            windows.append(Window(tuple(tuple(range(start, start + n)) for n in short), config.end))
            return windows
        consumed = sum(len(window.micro[0]) for window in windows) * world_size * config.micro_batch_size
        while True:  # as iterate() runs: each window takes what every rank still has, up to the plan's length
            accum = _accum_at(config, world_size, consumed)
            common = min(*short, accum)
            if common == 0:
                break
            windows.append(
                Window(tuple(tuple(range(start, start + common)) for _ in short), "full" if common == accum else "data")
            )
            start += common
            short = [n - common for n in short]
            consumed += common * world_size * config.micro_batch_size
            if common < accum:
                break
    return windows


def _counted_micro_batches(windows: list[Window], world_size: int) -> list[tuple[int, int]]:
    return [(rank, index) for window in windows for rank in range(world_size) for index in window.micro[rank]]


def _window_of(windows: list[Window], place: tuple[int, int]) -> int:
    rank, index = place
    return next(number for number, window in enumerate(windows) if index in window.micro[rank])


# --- model, data, optimizer: plain torch, shared by both sides -----------------------------------------------------


class Net(nn.Module):
    """A body, a head, a branch that some micro-batches skip, and optionally a frozen layer."""

    def __init__(self, out_features: int, frozen: str | None) -> None:
        super().__init__()
        self.body = nn.Linear(IN_FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, out_features)
        self.branch = nn.Linear(IN_FEATURES, out_features)
        self.frozen = nn.Linear(IN_FEATURES, HIDDEN) if frozen is not None else None
        if self.frozen is not None:
            self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        hidden = torch.tanh(self.body(x))
        if self.frozen is not None:
            hidden = hidden + torch.tanh(self.frozen(x))
        out = self.head(hidden)
        return out + self.branch(x) if use_branch else out


def param_dtype(config: Config) -> torch.dtype:
    return {"fp32": torch.float32, "double": torch.float64, "default64": torch.float64, "bf16": torch.bfloat16}[
        config.dtype
    ]


@contextlib.contextmanager
def default_dtype(config: Config) -> Iterator[None]:
    """``torch.set_default_dtype(torch.float64)`` for the ``default64`` dtype, restored as found."""
    found = torch.get_default_dtype()
    if config.dtype == "default64":
        torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(found)


def make_net(config: Config, seed: int = 0, dtype: torch.dtype | None = None) -> Net:
    """The model in the config's dtype (``default64``: built in the float64 default, no cast)."""
    torch.manual_seed(1000 + seed)
    net = Net(config.out_features, config.frozen)
    if config.dtype in ("double", "bf16"):
        net = net.to(param_dtype(config))
    return net if dtype is None else net.to(dtype)


def micro_batch(config: Config, rank: int, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s micro-batch ``index``: inputs, targets and item mask (float64 drawn, then cast)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 10_007 + index)
    size = config.micro_batch_size
    x = torch.randn(size, IN_FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randn(size, config.out_features, generator=generator, dtype=torch.float64)
    mask = torch.rand(size, generator=generator, dtype=torch.float64) < 0.7
    if config.items and not mask.any():
        mask[0] = True  # only the chosen micro-batch is all-ignored
    if not config.items:
        mask[:] = True
    if config.dtype == "bf16":  # the float64 truth of a bf16 run sees the same (rounded) data
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    return x.to(dtype), y.to(dtype), mask


def uses_branch(config: Config, rank: int, index: int, first_window: int) -> bool:
    """Whether micro-batch ``index`` of ``rank`` runs the branch. FSDP2 gets a pattern shared by all ranks (torch:
    a parameter with a gradient on one rank only is a collective size mismatch in FSDP2's reduce-scatter)."""
    if config.unused == "none":
        return True
    if config.unused == "window" and index < first_window:
        return False
    offset = 0 if config.backend == "fsdp2" else rank
    return (index + offset) % 2 == 0


def item_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor, use_branch: bool) -> torch.Tensor:
    return (net(x, use_branch) - y).square().mean(dim=-1)


def micro_loss(
    config: Config, net: nn.Module, place: tuple[int, int], the_script: Script, dtype: torch.dtype
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One micro-batch's loss as a user writes it (a mean over its items), its item count, and its item-loss sum."""
    rank, index = place
    x, y, mask = micro_batch(config, rank, index, dtype)
    if place == the_script.empty:
        mask = torch.zeros_like(mask)
    per_item = item_losses(net, x, y, uses_branch(config, rank, index, len(the_script.windows[0].micro[0])))
    count = int(mask.sum())
    total = (per_item * mask.to(per_item.dtype)).sum()
    loss = total / max(count, 1) if config.items else per_item.mean()
    if place == the_script.nan:
        loss, total = loss * float("nan"), total * float("nan")
    return loss, count, total


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer over ``model``'s parameters (a frozen layer's too with ``frozen="all"``, as
    ``optimizer(model.parameters())`` holds them; only the trainable ones with ``"trainable"``)."""
    flags: dict[str, Any] = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[
        config.impl
    ]
    settings: dict[str, Any] = {
        "sgd": {"lr": 0.1},
        "momentum": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        "adam": {"lr": 0.02},
        "adamw": {"lr": 0.02, "weight_decay": 0.1},
    }[config.optimizer]
    kind = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or config.frozen == "all"]
    if config.groups:
        late = [p for name, p in named if ".head." in f".{name}" or ".branch." in f".{name}"]
        early = [p for name, p in named if not (".head." in f".{name}" or ".branch." in f".{name}")]
        params: Any = [{"params": early}, {"params": late, "lr": settings["lr"] / 2}]
    else:
        params = [p for _, p in named]
    return kind[config.optimizer](params, **settings, **flags)


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any | None:
    if config.scheduler == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return None


def computes_norm(config: Config) -> bool:
    return config.max_grad_norm is not None or config.report_grad_norm or config.noise_scale


# --- the reference: one process, one backward per real batch, no distaccum -----------------------------------------


@dataclass
class Expected:
    """The reference's run: the final weights, the initial ones, and each window's step result (as a dict)."""

    state: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    steps: list[dict[str, Any]]


def reference(
    config: Config, world_size: int, dtype: torch.dtype | None = None, per_micro_batch: bool = False
) -> Expected:
    """Train on each window's real batch in one process (``dtype``: cast the model, e.g. float64 for bf16's truth).

    The window's loss is written out: with ``num_items`` the sum of every item loss over all micro-batches and ranks
    divided by the global item count; without, the mean of the micro-batch means over the micro-steps the window
    really had. One backward, the norm of the whole gradient, clipping, one optimizer step, one scheduler step. A
    window with a NaN loss, or no item at all, is skipped (no step, no scheduler step).

    ``per_micro_batch``: one backward per micro-batch instead, the gradients summed in ``.grad`` as autograd does:
    in bf16 that is the rounding a window summed in bf16 cannot avoid (the bound of bf16 sums, not the truth).
    """
    the_script = script(config, world_size)
    with default_dtype(config):  # only for the initial weights (drawn in float64 there); the run sets its dtypes
        net = make_net(config, dtype=dtype or param_dtype(config))
    work_dtype = next(net.parameters()).dtype
    initial = {name: value.detach().clone() for name, value in net.state_dict().items()}
    optimizer = make_optimizer(config, net)
    scheduler = make_scheduler(config, optimizer)
    steps = []
    for number, window in enumerate(the_script.windows, start=1):
        places = [(rank, index) for rank in range(world_size) for index in window.micro[rank]]
        losses, counts, sums = zip(
            *(micro_loss(config, net, place, the_script, work_dtype) for place in places), strict=True
        )
        items = sum(counts)
        # The exact weighting, written out: the global item mean, or the mean of the micro-batch means.
        loss = sum(sums) / max(items, 1) if config.items else sum(losses) / len(losses)
        nan = the_script.nan in places
        skipped = nan or (config.items and items == 0)
        step = {
            "step": number,
            "loss": loss.item() if not (config.items and items == 0) else math.nan,
            "micro_steps": len(places),
            "num_items": items if config.items else None,
            "skipped": skipped,
            "grad_norm": None,
        }
        steps.append(step)
        if skipped:
            continue
        optimizer.zero_grad(set_to_none=True)
        if per_micro_batch:
            parts = sums if config.items else losses
            for part in parts:
                (part / (max(items, 1) if config.items else len(losses))).backward(retain_graph=True)
        else:
            loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        if computes_norm(config):
            step["grad_norm"] = float(norm)
        if config.max_grad_norm is not None:
            coefficient = min(config.max_grad_norm / (float(norm) + 1e-6), 1.0)
            for grad in grads:
                grad.mul_(coefficient)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    state = {name: value.detach().clone() for name, value in net.state_dict().items()}
    return Expected(state=state, initial=initial, steps=steps)


# --- the verdict -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How one configuration fared: ``ok`` (equal, or refused at construction) and what was seen."""

    ok: bool
    kind: str  # "equal", "refused", "mismatch", "crash", "late refusal"
    detail: str
    weight_error: float | None = None
    bound: float | None = None


def strip(name: str) -> str:
    for prefix in ("module.", "_fsdp_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def weight_error(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> float:
    """``||actual - expected|| / ||expected - initial||`` over all tensors: relative to what training changed."""
    actual = {strip(k): v for k, v in actual.items()}
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    off = math.sqrt(sum(float((actual[k].double() - expected[k].double()).square().sum()) for k in expected))
    moved = math.sqrt(sum(float((expected[k].double() - initial[k].double()).square().sum()) for k in expected))
    if moved == 0.0:  # nothing stepped: relative to the weights themselves
        moved = math.sqrt(sum(float(expected[k].double().square().sum()) for k in expected))
    return off / moved


TOLERANCE = {"fp32": 1e-5, "double": 1e-10, "default64": 1e-10}
BF16_FACTOR = 3.0
BF16_FACTOR_REDUCED = 6.0
BF16_FLOOR = 1e-2
BF16_SCALAR_FLOOR = 2e-2  # a loss near 1 reported in bf16 moves in steps of 2^-7 (0.8%)


def judge(config: Config, world_size: int, ranks: list[dict[str, Any]], mutated: bool = False) -> Verdict:
    """The verdict on one configuration from every rank's record (:func:`combination_workers.run_config`)."""
    statuses = {record["status"] for record in ranks}
    if statuses == {"refused"}:
        if documented_refusal(config) is None:
            return Verdict(False, "unexpected refusal", ranks[0]["error"])
        return Verdict(True, "refused", ranks[0]["error"])
    if "crash" in statuses or len(statuses) > 1:
        return _crash_verdict(ranks)
    if config.exact:
        expected = reference(config, world_size)
        bound = TOLERANCE[config.dtype]
        scalar_bounds = _scalar_bounds(expected.steps, None, bound)
    else:  # bf16: against the float64 truth, within a few times the bf16 real batch's own distance from it
        expected = reference(config, world_size, dtype=torch.float64)
        own = reference(config, world_size)
        baselines = [own]
        if sums_in_bf16(config) or config.accumulate_dtype is None:  # warned, or asked for: bf16 sums
            baselines.append(reference(config, world_size, per_micro_batch=True))
        distance = max(weight_error(base.state, expected.state, expected.initial) for base in baselines)
        # Reduced in bf16 at every micro-step (warned): a second rounding per micro-step that no one-process
        # baseline has (soak seed 1: 1.1-1.2x the plain bound on 2 of 2,000).
        factor = BF16_FACTOR_REDUCED if _syncs_in_window(config) else BF16_FACTOR
        bound = factor * distance + BF16_FLOOR
        scalar_bounds = _scalar_bounds(expected.steps, [base.steps for base in baselines], BF16_SCALAR_FLOOR)
    problems = []
    weight = None
    for rank, record in enumerate(ranks):
        error = weight_error(record["state"], expected.state, expected.initial)
        weight = error if weight is None else max(weight, error)
        if not error <= bound:
            problems.append(f"rank {rank}: weights off by {error:.3g} of the change (bound {bound:.3g})")
        problems += _step_problems(rank, record["steps"], expected.steps, scalar_bounds)
    if sums_in_bf16(config) and not any("bfloat16" in text for text in ranks[0]["warnings"]):
        problems.append("the window's gradients are summed in bfloat16 without a warning")
    if problems:
        return Verdict(False, "mismatch", "; ".join(problems[:4]), weight, bound)
    return Verdict(True, "equal", "", weight, bound)


def documented_refusal(config: Config) -> str | None:
    """Which documented rule lets ``Accumulator(...)`` refuse ``config`` (None: it must run). A refusal outside
    these is a failure too: a harness that accepted any refusal would pass an accumulator that refuses everything."""
    sharded = config.backend in SHARDED
    if config.grad_sync == "sharded" and not sharded:
        return "grad_sync='sharded' where nothing is sharded"
    if config.accumulate_dtype == "float32" and _syncs_in_window(config):
        return "float32 sums are reduced by hand at the boundary; this grad_sync reduces in every backward"
    if config.accumulate_dtype == "float32" and sharded and config.dtype == "bf16":
        return "FSDP keeps the window's bf16 gradients in its own buffers (MixedPrecisionPolicy is the way)"
    if config.noise_scale and sharded:
        return "noise_scale reads param.grad, which FSDP does not hold during the window"
    return None


def _syncs_in_window(config: Config) -> bool:
    """Whether backward reduces inside the window too (``"every"`` on several ranks, ``"sharded"`` on FSDP)."""
    if config.backend == "plain":
        return False
    return config.grad_sync == "every" or (config.backend in SHARDED and config.grad_sync == "sharded")


def sums_in_bf16(config: Config) -> bool:
    """Whether the window's bf16 gradients are summed in bf16 with the default ``accumulate_dtype="auto"``, which
    must then warn (float32 sums where the wrapper allows them: plain and DDP at the boundary)."""
    longest = config.accum_steps + 1 if config.batch_schedule else config.accum_steps
    # One process reduces nothing, so its "every" is its "boundary".
    in_float32 = config.backend == "plain" or (config.backend == "ddp" and config.grad_sync in (None, "boundary"))
    return config.dtype == "bf16" and config.accumulate_dtype == "auto" and longest > 1 and not in_float32


def _crash_verdict(ranks: list[dict[str, Any]]) -> Verdict:
    """The first cause: a rank's own error before a peer's gloo error (the crashed rank left the group)."""

    def consequence(record: dict[str, Any]) -> bool:
        return record["status"] == "crash" and "gloo" in record["error"] and "pair.cc" in record["error"]

    failed = sorted((r for r in ranks if r["status"] != "ran"), key=consequence)
    first = failed[0]
    if first["status"] == "refused":  # refused on some ranks only: the others went on
        return Verdict(False, "refused on some ranks", first["error"])
    kind = "late refusal" if first.get("refusal") else "crash"
    detail = " | ".join(f"rank {ranks.index(r)}: {r['error']}" for r in failed)
    return Verdict(False, kind, detail)


def _scalar_bounds(
    truth: list[dict[str, Any]], baselines: list[list[dict[str, Any]]] | None, tolerance: float
) -> list[dict[str, float]]:
    """Per step, how far loss and grad_norm may be from the truth: ``tolerance`` relative, or for bf16
    (``baselines``: the bf16 runs' steps) BF16_FACTOR times the largest distance of a baseline plus that floor."""
    bounds = []
    for number, want in enumerate(truth):
        step = {}
        for key in ("loss", "grad_norm"):
            value = want[key]
            if value is None or math.isnan(value):
                step[key] = math.inf
                continue
            floor = tolerance * max(abs(value), 1e-3)
            seen = [base[number][key] for base in baselines or []]
            distances = [abs(other - value) for other in seen if other is not None and not math.isnan(other)]
            step[key] = BF16_FACTOR * max(distances, default=0.0) + floor
        bounds.append(step)
    return bounds


def _close(actual: float | None, expected: float | None, bound: float) -> bool:
    if expected is None or actual is None:
        return actual is None and expected is None
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    return abs(actual - expected) <= bound


def _step_problems(
    rank: int, actual: list[dict[str, Any]], expected: list[dict[str, Any]], bounds: list[dict[str, float]]
) -> list[str]:
    if len(actual) != len(expected):
        return [f"rank {rank}: {len(actual)} steps, the reference {len(expected)}"]
    problems = []
    for got, want, bound in zip(actual, expected, bounds, strict=True):
        prefix = f"rank {rank} step {want['step']}"
        for key in ("step", "micro_steps", "num_items", "skipped"):
            if got[key] != want[key]:
                problems.append(f"{prefix}: {key} {got[key]} != {want[key]}")
        if not _close(got["loss"], want["loss"], bound["loss"]):
            problems.append(f"{prefix}: loss {got['loss']!r} != {want['loss']:.8g}")
        norm_known = want["grad_norm"] is not None and not want["skipped"]
        if norm_known and not _close(got["grad_norm"], want["grad_norm"], bound["grad_norm"]):
            problems.append(f"{prefix}: grad_norm {got['grad_norm']!r} != {want['grad_norm']:.8g}")
    return problems


@dataclass(frozen=True)
class KnownFailure:
    """A failure on the current code: its issue-24 row, which configurations show it, one fixed example."""

    name: str
    row: str
    matches: Callable[[Config, int], bool]
    example: Config
    world_size: int


def known_failure(config: Config, world_size: int) -> KnownFailure | None:
    """The known failure ``config`` would show, if any (the sampler leaves those out)."""
    return next((known for known in KNOWN_FAILING if known.matches(config, world_size)), None)


def _files_on_fsdp(config: Config) -> bool:
    return config.backend in SHARDED and config.checkpoint is not None and config.checkpoint_via != "memory"


KNOWN_FAILING: tuple[KnownFailure, ...] = (
    KnownFailure(
        name="bf16-items-partly-used-branch-adam",
        row="found by the harness (soak seed 2, not resolved): bf16 with num_items, a branch used on some "
        "micro-batches only, Adam/AdamW: 0.14-0.16 of the training change from the float64 truth, where the bf16 "
        "real batch (one backward, or one per micro-batch) is 0.026 (fp32 and float64 of the same configuration are "
        "exact). Suspected: each micro-step's item weight n / (c * k) seeds a bf16 backward, rounded to 8 bits, and "
        "Adam amplifies the branch's one-micro-batch gradient error",
        matches=lambda c, w: c.dtype == "bf16" and c.items and c.unused != "none" and c.optimizer in ("adam", "adamw"),
        example=Config(
            dtype="bf16",
            optimizer="adam",
            groups=True,
            unused="some",
            out_features=1,
            micro_batch_size=3,
            items=True,
            empty_micro_batch=True,
            report_grad_norm=True,
            batch_schedule=True,
            grad_sync="boundary",
            accumulate_dtype="float32",
            seed=61831,
        ),
        world_size=1,
    ),
    KnownFailure(
        name="fsdp1-checkpoint-files-empty-shard",
        row="found by the harness (checkpoint row, like 3): distaccum.checkpoint.load on FSDP1 when a parameter "
        "has fewer rows than ranks",
        matches=lambda c, w: _files_on_fsdp(c) and c.backend == "fsdp1" and c.out_features == 1,
        example=Config(backend="fsdp1", out_features=1, checkpoint="boundary", checkpoint_via="files"),
        world_size=2,
    ),
    KnownFailure(
        name="fsdp-checkpoint-files-param-without-state",
        row="found by the harness (checkpoint row, like 3): on FSDP, a parameter with no optimizer state yet (the "
        "branch unused so far) cannot go through torch.distributed.checkpoint exactly; distaccum.checkpoint.save now "
        "refuses it with the fix (it was 7.7e-2 off on FSDP1, a missing key at load on FSDP2), a refusal after "
        "construction: still a failure by the harness's rule",
        matches=lambda c, w: _files_on_fsdp(c) and c.unused == "window",
        example=Config(
            backend="fsdp2", optimizer="adam", unused="window", checkpoint="boundary", checkpoint_via="files"
        ),
        world_size=2,
    ),
)


FSDP_AFTER_SKIPPED_WINDOW = Config(
    backend="fsdp2", optimizer="adam", nan=True, checkpoint="boundary", checkpoint_via="files"
)
DDP_FLUSH_UNUSED = Config(
    backend="ddp",
    optimizer="momentum",
    unused="some",
    accum_steps=3,
    micro_batch_size=1,
    full_windows=3,
    end="flush",
    short=1,
    uneven=True,
    seed=60680,
)


# Fixed configurations, run in CI on their world size: every failure the harness found (keep them after the fix)
# and the rows of issue 24 it covers. (name, config, world size).
REGRESSIONS: tuple[tuple[str, Config, int], ...] = (
    *((known.name, known.example, known.world_size) for known in KNOWN_FAILING),
    # Found by the harness and fixed (each failed before its fix):
    # get_state_dict's zero-gradient step on an optimizer without state moved Adam's step count (0.256 off).
    ("fsdp-checkpoint-files-after-skipped-window", FSDP_AFTER_SKIPPED_WINDOW, 2),
    # flush()'s hand reduction gave a parameter no rank used a zero gradient, moved by momentum (0.12-0.19 off).
    ("ddp-flush-unused-param-zero-grad", DDP_FLUSH_UNUSED, 2),
    # after load_state_dict, a rank with no micro-step left flushed while its peer agreed on the plan: a hang.
    (
        "ddp-uneven-flush-after-resume",
        Config(backend="ddp", end="flush", short=1, uneven=True, full_windows=1, checkpoint="boundary"),
        2,
    ),
    # DDP's bucket rebuild broadcast in the first forward after its first synced backward met a flushing rank's
    # all-reduce: a hang (the sampler steered around it as torch's); distaccum now rebuilds at that boundary.
    (
        "ddp-uneven-flush-after-the-first-window",
        Config(backend="ddp", end="flush", short=1, uneven=True, full_windows=1),
        2,
    ),
    ("row1-default-float64-plain", Config(dtype="default64", max_grad_norm=0.05), 1),
    ("row1-default-float64-plain-fused-adam", Config(dtype="default64", optimizer="adam", impl="fused"), 1),
    ("row1-default-float64-ddp", Config(backend="ddp", dtype="default64"), 2),
    ("row1-default-float64-fsdp2", Config(backend="fsdp2", dtype="default64", optimizer="adam"), 2),
    ("row2-fsdp2-one-row-bias-no-clipping", Config(backend="fsdp2", out_features=1), 2),
    ("row2-fsdp2-one-row-bias-report-norm", Config(backend="fsdp2", out_features=1, report_grad_norm=True), 2),
    (
        "row3-ddp-ragged-items-mid-window-files",
        Config(backend="ddp", items=True, accum_steps=3, checkpoint="mid", checkpoint_via="files", seed=3),
        2,
    ),
    (
        "issue25-signed-boundary-files-fsdp2",
        Config(backend="fsdp2", optimizer="adam", checkpoint="boundary", checkpoint_via="signed-files", seed=5),
        2,
    ),
    (
        "issue25-signed-mid-window-files-ddp",
        Config(backend="ddp", items=True, accum_steps=3, checkpoint="mid", checkpoint_via="signed-files", seed=4),
        2,
    ),
    ("row7-ddp-bf16-every-warns", Config(backend="ddp", dtype="bf16", grad_sync="every", accum_steps=4), 2),
    ("row7-fsdp2-bf16-sharded-warns", Config(backend="fsdp2", dtype="bf16", grad_sync="sharded", accum_steps=4), 2),
    ("found-frozen-params-in-optimizer-ddp", Config(backend="ddp", frozen="all"), 2),
    ("found-frozen-params-in-optimizer-fsdp1", Config(backend="fsdp1", frozen="all", optimizer="adamw"), 2),
    ("found-frozen-params-in-optimizer-fsdp2", Config(backend="fsdp2", frozen="all", optimizer="adamw"), 2),
    (
        "fsdp2-memory-checkpoint-after-skipped-window",
        dataclasses.replace(FSDP_AFTER_SKIPPED_WINDOW, checkpoint_via="memory"),
        2,
    ),
    (
        "plain-every-option",
        Config(
            optimizer="adamw",
            groups=True,
            frozen="all",
            unused="some",
            items=True,
            empty_micro_batch=True,
            max_grad_norm=0.05,
            report_grad_norm=True,
            noise_scale=True,
            scheduler="lambda",
            batch_schedule=True,
            end="iterate",
            short=2,
            nan=True,
            checkpoint="mid",
            accum_steps=3,
        ),
        1,
    ),
)


def failures(configs: list[Config], world_size: int, records: list[list[dict[str, Any]]]) -> list[str]:
    """One line per configuration whose verdict is a failure: what went wrong, and the config to paste into
    :data:`REGRESSIONS`."""
    lines = []
    for config, ranks in zip(configs, records, strict=True):
        verdict = judge(config, world_size, ranks)
        if not verdict.ok:
            lines.append(f"{verdict.kind}: {config.describe()}: {verdict.detail[:700]}\n    {config!r}")
    return lines
