"""The distaccum side of the combinatorial harness (:mod:`tests.helpers.combinations`): one configuration trained
through an Accumulator as a user writes the loop, and the per-rank body that runs many of them in one spawn.

Each configuration on several ranks gets a process group of its own (a fresh file rendezvous, a short collective
timeout), destroyed after it: a rank that crashed mid-collective leaves its peer nothing stale to pair with in the
next configuration, and the peer's wait ends when the crashed rank's group goes away (or at the timeout) instead of
hanging the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils._pytree import tree_map

from distaccum import Accumulator, BatchPlan, BatchSchedule
from tests.helpers import combinations as combos
from tests.helpers.combinations import Config, Script

BATCH = 500  # configurations per spawn: start-up (~5 s) amortised, and a dead rank loses only its batch
COLLECTIVE_TIMEOUT_S = 30.0  # far above any configuration's run (well under a second), far below the test's timeout


def wrap(net: nn.Module, config: Config, world_size: int) -> nn.Module:
    """DDP, FSDP1 or FSDP2 (root ``fully_shard``) around ``net``, as a user wraps it on CPU/gloo."""
    if config.backend == "plain":
        return net
    if config.backend == "ddp":
        return nn.parallel.DistributedDataParallel(net, find_unused_parameters=config.unused != "none")
    if config.backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(net, mesh=init_device_mesh("cpu", (world_size,)))


def build(config: Config, world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = wrap(combos.make_net(config, seed=seed), config, world_size)
    optimizer = combos.make_optimizer(config, model)
    return model, optimizer, combos.make_scheduler(config, optimizer)


def accumulator(config: Config, world_size: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any):
    stages = combos.stages(config, world_size)
    if stages is None:
        plan: BatchPlan | BatchSchedule = BatchPlan(
            accum_steps=config.accum_steps, micro_batch_size=config.micro_batch_size
        )
    else:
        plan = BatchSchedule(stages, micro_batch_size=config.micro_batch_size)
    accumulate_dtype: Any = torch.float32 if config.accumulate_dtype == "float32" else config.accumulate_dtype
    return Accumulator(
        model,
        optimizer,
        plan,
        scheduler=scheduler,
        max_grad_norm=config.max_grad_norm,
        on_nonfinite="skip",
        noise_scale=0.9 if config.noise_scale else None,
        report_grad_norm=config.report_grad_norm,
        accumulate_dtype=accumulate_dtype,
        grad_sync=config.grad_sync,
    )


def _clone(tree: Any) -> Any:
    return tree_map(lambda value: value.detach().clone() if isinstance(value, torch.Tensor) else value, tree)


class _Run:
    """One configuration's training on this rank: the objects, the step results, the resume."""

    def __init__(self, config: Config, rank: int, world_size: int, mutate: bool, directory: str) -> None:
        self.config, self.rank, self.world_size, self.mutate = config, rank, world_size, mutate
        self.directory = directory  # for checkpoint files, shared by the ranks
        self.script: Script = combos.script(config, world_size)
        self.model, self.optimizer, self.scheduler = build(config, world_size, seed=0)
        self.acc = accumulator(config, world_size, self.model, self.optimizer, self.scheduler)
        self.steps: list[dict[str, Any]] = []
        self.done = 0  # micro-steps this rank ran

    def micro_step(self, index: int, last: bool = False) -> None:
        config, place = self.config, (self.rank, index)
        dtype = next(p for p in self.model.parameters()).dtype
        with self.acc.micro_step(last=last):
            loss, count, _ = combos.micro_loss(config, self.model, place, self.script, dtype)
            if self.mutate and place == self.script.mutation:
                loss = loss * combos.MUTATION  # the self-test's hook: in this loop, never in distaccum
            if config.items:
                self.acc.backward(loss, num_items=count)
            else:
                self.acc.backward(loss)
        if self.acc.stepped:
            self.steps.append(dataclasses.asdict(self.acc.last_step))
        self.done += 1
        if self.done == self.script.checkpoint_after:
            self.resume()

    def resume(self) -> None:
        """Save the run (``acc.state_dict(include_grads=True)`` and the model's, optimizer's and scheduler's
        ``state_dict()`` in memory, or ``distaccum.checkpoint.save`` to files) and load it into fresh objects built
        from other initial weights.

        In memory it is torch's own ``state_dict()`` on every backend, not ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict``: that one initializes an optimizer without state by a step on zero gradients
        (``_init_optim_state``), which moves Adam's step count and momentum with weight decay (torch behaviour;
        the files path, which goes through it on FSDP, is distaccum's to get right)."""
        if self.config.checkpoint_via in ("files", "signed-files"):
            self._resume_from_files()
            return
        saved = {
            "model": _clone(self.model.state_dict()),
            "optimizer": _clone(self.optimizer.state_dict()),
            "acc": _clone(self.acc.state_dict(include_grads=True)),
            "scheduler": None if self.scheduler is None else _clone(self.scheduler.state_dict()),
        }
        self._rebuild()
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.acc.load_state_dict(saved["acc"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])

    def _resume_from_files(self) -> None:
        from distaccum import checkpoint

        key = "harness-secret" if self.config.checkpoint_via == "signed-files" else None  # HMAC-signed manifest
        parts = {"model": self.model, "optimizer": self.optimizer, "accumulator": self.acc, "scheduler": self.scheduler}
        checkpoint.save(self.directory, **parts, include_grads=True, key=key)
        self._rebuild()
        parts = {"model": self.model, "optimizer": self.optimizer, "accumulator": self.acc, "scheduler": self.scheduler}
        checkpoint.load(self.directory, **parts, key=key)

    def _rebuild(self) -> None:
        del self.model, self.optimizer, self.scheduler, self.acc
        self.model, self.optimizer, self.scheduler = build(self.config, self.world_size, seed=1)
        self.acc = accumulator(self.config, self.world_size, self.model, self.optimizer, self.scheduler)

    def train(self) -> None:
        if self.config.end == "iterate":
            self._train_iterate()
            return
        for window in self.script.windows:
            mine = window.micro[self.rank]
            for position, index in enumerate(mine):
                self.micro_step(index, last=window.end == "last" and position == len(mine) - 1)
            if window.end == "flush":
                result = self.acc.flush()
                if result is not None:
                    self.steps.append(dataclasses.asdict(result))

    def _train_iterate(self) -> None:
        data = list(range(self.script.data_lengths[self.rank]))
        while True:
            start, acc = self.done, self.acc
            for index in acc.iterate(data[start:]):
                self.micro_step(index)
                if self.acc is not acc:  # resumed: go on over the rest of the data with the fresh accumulator
                    break
            else:
                return

    def state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {name: value.detach().clone() for name, value in state.items()}


def run_config(config: Config, rank: int, world_size: int, directory: str, mutate: bool = False) -> dict[str, Any]:
    """Train ``config`` through distaccum on this rank; a record for :func:`combinations.judge`: ``refused`` (by
    ``Accumulator(...)``), ``crash`` (anything raised later, with the traceback) or ``ran`` (steps and weights).
    ``directory``: where checkpoint files go (every rank passes the same one), empty."""
    with combos.default_dtype(config), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = _Run(config, rank, world_size, mutate, directory)
        except (ValueError, TypeError) as error:
            if not _raised_by_distaccum(error):
                return _crash(error, 0)
            return {"status": "refused", "error": f"{type(error).__name__}: {error}"}
        except Exception as error:
            return _crash(error, 0)
        except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is one
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return _crash(error, 0)
        try:
            run.train()
            state = run.state()
        except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is not an Exception
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return _crash(error, run.done)
        steps = [{k: v for k, v in step.items() if k != "noise_scale"} for step in run.steps]
        return {"status": "ran", "steps": steps, "state": state, "warnings": sorted({str(w.message) for w in caught})}


def _raised_by_distaccum(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/distaccum/" in frames[-1].filename


def _crash(error: BaseException, done: int) -> dict[str, Any]:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    where = traceback.extract_tb(error.__traceback__)
    origin = f"{where[-1].filename}:{where[-1].lineno}" if where else "?"
    ours = [frame for frame in where if "/distaccum/" in frame.filename]
    if ours and ours[-1] is not where[-1]:  # the last call from distaccum into torch, for whoever fixes it
        origin += f", from {ours[-1].filename.split('/distaccum/')[-1]}:{ours[-1].lineno} {ours[-1].name}"
    return {
        "status": "crash",
        "error": f"after {done} micro-steps: {_shorten(text)} (at {origin})",
        "refusal": isinstance(error, (ValueError, TypeError)) and "/distaccum/" in origin,
    }


def _shorten(text: str) -> str:
    """The head and the tail (a nested traceback's last line names the cause)."""
    return text if len(text) <= 900 else f"{text[:300]} ... {text[-500:]}"


def _init_group(
    workdir: str, name: str, rank: int, world_size: int, timeout_s: float = COLLECTIVE_TIMEOUT_S
) -> torch_dist.Store:
    store = torch_dist.FileStore(f"{workdir}/{name}", world_size)
    store.set_timeout(timedelta(seconds=3 * timeout_s))  # outwaits a peer released by its collective timeout
    torch_dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    _store_barrier(store, "connected", world_size)
    return store


def _store_barrier(store: torch_dist.Store, key: str, world_size: int) -> None:
    """Wait for every rank through the store, not gloo: a rank stuck in a collective of a crashed configuration is
    released by its collective timeout, then arrives here. Leaving a group before the peer's gloo connection is
    complete (or while the peer still uses it) aborts the peer's process instead."""
    store.add(key, 1)
    while int(store.add(key, 0)) < world_size:
        time.sleep(0.002)


def run_many(
    rank: int,
    world_size: int,
    configs: list[Config],
    workdir: str,
    mutate: bool,
    timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """For :func:`tests.helpers.spawn.run_ranks`: every configuration in turn, each in a process group of its own
    whose collectives time out after ``timeout_s`` (a hang is a crash of that configuration, not of the batch).
    ``workdir/progress-<rank>.txt`` names the configurations started, for a rank that dies without a traceback."""
    torch_dist.destroy_process_group()
    records = []
    progress = Path(workdir, f"progress-{rank}.txt")
    for number, config in enumerate(configs):
        with progress.open("a") as log:
            log.write(f"{number} {config!r}\n")
        store = _init_group(workdir, f"group-{number}", rank, world_size, timeout_s)
        record = run_config(config, rank, world_size, f"{workdir}/checkpoint-{number}", mutate)
        records.append(record)
        gc.collect()  # no wrapped model outlives its group (dist.shutdown's order)
        gc.freeze()  # what survived (modules imported on the way) is not walked again: 0.12 s a collect else
        if record["status"] == "ran":
            # dist.shutdown's order: a gloo barrier lets the last collectives' work finish before the group goes
            # (without it gloo aborted a rank now and then, "Resource deadlock avoided"). A peer that crashed has
            # left already: the barrier fails at once.
            with contextlib.suppress(RuntimeError):
                torch_dist.barrier()
            torch_dist.destroy_process_group()
        else:
            # Leaving first ends a peer's wait in a collective of this configuration at once (a gloo read error)
            # instead of at its timeout, after which gloo can abort the process later.
            torch_dist.destroy_process_group()
        _store_barrier(store, "finished", world_size)
    _init_group(workdir, "group-final", rank, world_size)  # the one run_ranks leaves through
    return records


def run_batches(
    configs: list[Config],
    workdir: str,
    *,
    world_size: int,
    mutate: bool = False,
    timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> list[list[dict[str, Any]]]:
    """Every configuration on ``world_size`` spawned ranks, ``BATCH`` per spawn; per configuration, its ranks'
    records. A rank that dies (gloo aborts in C++ leave no traceback) fails with the configuration it was on."""
    from tests.helpers.spawn import run_ranks

    records: list[list[dict[str, Any]]] = []
    for start in range(0, len(configs), BATCH):
        batch = configs[start : start + BATCH]
        folder = Path(workdir, f"batch-{start}")
        folder.mkdir(parents=True)
        limit = 60.0 + 1.0 * len(batch) + 3 * timeout_s  # ~0.1 s a configuration; room for one hang
        try:
            by_rank = run_ranks(run_many, batch, str(folder), mutate, timeout_s, world_size=world_size, timeout_s=limit)
        except (AssertionError, TimeoutError) as error:
            running = [path.read_text().splitlines()[-1:] for path in sorted(folder.glob("progress-*.txt"))]
            raise AssertionError(f"the ranks failed while running {running}") from error
        records += [list(ranks) for ranks in zip(*by_rank, strict=True)]
    return records
