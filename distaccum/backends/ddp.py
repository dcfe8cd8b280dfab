"""``DistributedDataParallel``: ``no_sync()`` inside the window; the end of data all-reduces by hand.

The boundary's reduction goes through a comm hook of distaccum's (:class:`CheckedAverage`): it all-reduces each
bucket as DDP's default does, then divides it by the world size and checks it for NaN/inf in one fused pass
(GradScaler's kernel). The reduced gradient is the same on every rank, so this local check is a global one,
and the non-finite guard costs no pass beyond the hook's division (DDP without a hook divides for free while it
fills its buckets, so against a plain DDP loop that pass is the guard's price). The hook is registered at the first
boundary; a model that has a comm hook by then (the user's: compression, PowerSGD) keeps it, and the check is
one read of the gradients at the step instead (DDP allows one hook per model: a script that registers its own
after the first optimizer step gets torch's "can only be called once" error). DDP's Python reducer
(``torch._dynamo.config.optimize_ddp = "python_reducer"``, which compiled autograd needs) calls comm hooks per
parameter, not per bucket: there the check is also the step's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import collectives
from distaccum.backends.base import Backend, EarlyCheck, GradSync, Params, StepOptions, StepWindow, grads_of


class DDPBackend(Backend):
    """DDP (also what ``accelerator.prepare`` returns on several processes): one reduction, in the boundary
    backward (``grad_sync="every"``: in every micro-step's); gradients stay in ``param.grad``."""

    name = "ddp"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.parallel.DistributedDataParallel)

    @classmethod
    def inner(cls, model: nn.Module) -> nn.Module | None:
        return model.module if isinstance(model.module, nn.Module) else None

    def __init__(self, model: nn.Module, world_size: int) -> None:
        super().__init__(model, world_size)
        self._graph_recorded = not getattr(model, "static_graph", False)
        self.hook: CheckedAverage | None = None
        """distaccum's comm hook state (None before the first sync, or when the model has a comm hook of its own)."""
        self._hook_tried = False
        self._forwards = ForwardCount.attach(model)  # join_reduction asks whether this micro-step's forward ran
        self._forwards_at_sync = 0
        self._buckets_rebuilt = False

    def boundary_sync(self) -> contextlib.AbstractContextManager[None] | None:
        self._prepare_sync()
        return None

    def _prepare_sync(self) -> None:
        """Before each backward that reduces: count its forward (:meth:`join_reduction`), attach the checking hook."""
        self._forwards_at_sync = self._forwards.value
        # At the first boundary, not at construction: a script that registers its own comm hook after building the
        # Accumulator (DDP takes only one) keeps it, and its reductions are then checked at the step instead.
        if not self._hook_tried:
            self._hook_tried = True
            # DDP's Python reducer (optimize_ddp="python_reducer", for compiled autograd) calls comm hooks once per
            # parameter with (grad, param), not with a GradBucket: ours would fail there, so the step checks instead.
            if not getattr(self.model, "_use_python_reducer", False):
                self.hook = CheckedAverage.attach(self.model)

    def grad_sync_refusal(self, mode: GradSync) -> str | None:
        if mode != "sharded":
            return None
        return (
            "DDP keeps a whole gradient on every rank, so nothing is sharded. Use 'boundary' (the default: one "
            "all-reduce per optimizer step) or 'every' (one per micro-step), or shard the model with FSDP2 "
            "(fully_shard) to keep gradients sharded"
        )

    @property
    def syncs_in_window(self) -> bool:
        return self.grad_sync == "every"

    hand_reduction_is_collective = True

    def float32_sums_refusal(self) -> tuple[str, str] | None:
        if self.syncs_in_window:
            return super().float32_sums_refusal()
        if getattr(self.model, "static_graph", False):
            return (
                "DDP(static_graph=True) must sync its first backward through DDP's own reduction, in the parameters' "
                "dtype, before the window's float32 sums could be reduced once",
                "Pass static_graph=False (under distaccum DDP syncs once per window anyway)",
            )
        return None

    def collective_free_refusal(self) -> str | None:
        if getattr(self.model, "static_graph", False):
            return "DDP(static_graph=True) must sync its first backward, before the ranks could agree"
        if getattr(self.model, "broadcast_buffers", False) and any(True for _ in self.model.buffers()):
            return "DDP(broadcast_buffers=True) broadcasts the buffers in every forward; pass broadcast_buffers=False"
        return None

    def reduce_by_hand(self, tensors: list[torch.Tensor], factor: float) -> None:
        """:meth:`reduce_tensors` of the window's sums; then DDP's buffer sync from rank 0 (``broadcast_buffers``),
        which no forward made in a window without sync."""
        self.reduce_tensors(tensors, factor)
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        model = self.model
        buffers = list(getattr(model, "modules_buffers", ())) if getattr(model, "broadcast_buffers", False) else []
        if not buffers:
            return
        group = getattr(model, "process_group", None)
        source = 0 if group is None else torch_dist.get_global_rank(group, 0)
        for bucket in buckets(buffers, int(getattr(model, "bucket_bytes_cap", 25 * 2**20))):
            flat = torch._utils._flatten_dense_tensors(bucket)
            torch_dist.broadcast(flat, src=source, group=group)
            for buffer, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                buffer.copy_(synced)

    def window_sync(self) -> contextlib.AbstractContextManager[None]:
        if self.grad_sync != "every":
            return self._no_sync()
        # "every": DDP reduces in each backward (through the checking hook from the first one); each reduction
        # averages (reduced so far + this rank's new), which is the reduced sum so far + the new average.
        self._prepare_sync()
        return contextlib.nullcontext()

    def _no_sync(self) -> contextlib.AbstractContextManager[None]:
        if not self._graph_recorded:
            # DDP(static_graph=True) records its graph in the first backward, which fails under no_sync (torch issue
            # 143580). That one micro-step syncs instead, which stays exact: the boundary's average of an already
            # averaged, rank-constant gradient is itself. One extra reduction per run.
            self._graph_recorded = True
            return contextlib.nullcontext()
        return self.model.no_sync()  # type: ignore[operator]

    def early_check(self, params: Params, options: StepOptions, *, norm: bool) -> EarlyCheck:
        hook = self.hook
        if not norm and hook is not None and hook.checked:  # the boundary reduction checked it, on every rank alike
            return EarlyCheck(nonfinite=hook.take_flag())
        return super().early_check(params, options, norm=norm)  # the user's own hook: checked here all the same

    def step(
        self, optimizer: torch.optim.Optimizer, params: Params, options: StepOptions, window: StepWindow
    ) -> tuple[float | None, bool]:
        try:
            result = super().step(optimizer, params, options, window)
        finally:
            if self.hook is not None:
                self.hook.reset()  # whatever the step used, the next window starts unchecked
        self._rebuild_buckets()
        return result

    def _rebuild_buckets(self) -> None:
        # DDP rebuilds its buckets once, in the first forward after its first synced backward, with a broadcast in
        # that forward: a rank whose data ended (flush() of a short window) would meet it with the flush's
        # all-reduce and hang both. At the boundary every rank is in step, so the rebuild happens here instead
        # (as DDP's own join hook does); later forwards find it done.
        # Until it has happened: a first window stepped by flush() ran no synced backward yet, and DDP's check that
        # finds nothing to rebuild runs no collective.
        if self._buckets_rebuilt:
            return
        reducer = getattr(self.model, "reducer", None)
        if reducer is None or getattr(self.model, "_use_python_reducer", False):
            self._buckets_rebuilt = True
            return
        self._buckets_rebuilt = bool(reducer._rebuild_buckets())

    def join_reduction(self) -> bool:
        """A micro-step whose backward would have reduced raised before it: run the collectives the other ranks
        run in it (the forward's, when this rank's forward did not run, and the backward's bucket all-reduces),
        with a backward of zeros, so that they do not wait for this rank until the process group's timeout. The
        window is discarded (on every rank, through the boundary's all-reduce), so what this rank sends is never
        used. Not where DDP's forward records which parameters it used (``find_unused_parameters``) or its graph
        (``static_graph``): a backward of zeros would mark those twice.
        """
        model = self.model
        flags = getattr(model, "find_unused_parameters", False) or getattr(model, "static_graph", False)
        if flags or getattr(model, "_use_python_reducer", False) or not torch.is_grad_enabled():
            return False
        ran = self._forwards.value != self._forwards_at_sync
        params = [p for p in model.parameters() if p.requires_grad]
        zeros = torch.stack([p.reshape(-1)[:1].sum() * 0.0 for p in params]).sum()  # every parameter, no compute
        if not ran:  # the peers' forward broadcast buffers (and, once, bucket indices) and armed the reducer
            model._pre_forward()  # type: ignore[operator]
            zeros = model._post_forward(zeros)  # type: ignore[operator]
        zeros.backward()
        return True

    def discard_grads(self, optimizer: torch.optim.Optimizer) -> None:
        super().discard_grads(optimizer)
        if self.hook is not None:
            self.hook.reset()

    def reduce_pending(self, params: Params) -> None:
        """All-reduce gradients accumulated under ``no_sync`` by hand (a short window at the end of data, or every
        window under ``auto_micro_batch``), in buckets of DDP's ``bucket_cap_mb``: a flat copy of the whole
        gradient would double its memory at the boundary. Nothing under ``grad_sync="every"``: reduced already."""
        if self.syncs_in_window:
            return
        # A rank that ran no micro-step in the short window still joins the all-reduce, with zeros. A parameter no
        # rank gave a gradient keeps None, as under DDP's own reduction: a zero would still move it under momentum
        # or weight decay. Whether each one had a gradient is summed over the ranks first.
        trainable = [param for param in params if param.requires_grad]
        had = collectives.sum_over_ranks([float(param.grad is not None) for param in trainable])
        for param in trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if self.hook is not None:
            self.hook.reset()  # reduced by hand, not through the hook: the step checks the gradients itself
        self.reduce_tensors(grads_of(params))
        for param, count in zip(trainable, had, strict=True):
            if not count:
                param.grad = None

    def reduce_tensors(self, tensors: list[torch.Tensor], factor: float = 1.0) -> None:
        """Average ``tensors`` over the ranks in place and multiply them by ``factor`` (folded into the division),
        one all-reduce per bucket of DDP's ``bucket_cap_mb`` (runs of one dtype and device, in order): every rank
        must pass tensors of the same shapes, dtypes and order."""
        group = getattr(self.model, "process_group", None)
        for bucket in buckets(tensors, int(getattr(self.model, "bucket_bytes_cap", 25 * 2**20))):
            flat = torch._utils._flatten_dense_tensors(bucket)
            torch_dist.all_reduce(flat, group=group)
            if factor == 1.0:
                flat.div_(self.world_size)
            else:
                flat.mul_(factor / self.world_size)
            for tensor, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                tensor.copy_(reduced)


def buckets(grads: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """``grads`` in order, cut into runs of one dtype and device of at most ``cap_bytes`` (a larger tensor alone)."""
    runs: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        last = runs[-1][-1] if runs else None
        if last is None or (last.dtype, last.device) != (grad.dtype, grad.device) or size + nbytes > cap_bytes:
            runs.append([])
            size = 0
        runs[-1].append(grad)
        size += nbytes
    return runs


class ForwardCount:
    """Forwards through a DDP module, counted by a forward pre-hook registered once per module."""

    def __init__(self) -> None:
        self.value = 0

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        self.value += 1

    @classmethod
    def attach(cls, model: nn.Module) -> ForwardCount:
        existing = getattr(model, "_distaccum_forward_count", None)
        if isinstance(existing, ForwardCount):
            return existing
        counter = cls()
        model.register_forward_pre_hook(counter)
        model._distaccum_forward_count = counter  # type: ignore[assignment]
        return counter


class CheckedAverage:
    """State of distaccum's DDP comm hook: all-reduce a bucket, then divide it by the world size and record
    whether it holds a NaN/inf, in one fused pass.

    Args:
        group: the DDP model's process group.
    """

    def __init__(self, group: torch_dist.ProcessGroup | None) -> None:
        self.group = group
        self.world_size = torch_dist.get_world_size(group)
        self.reductions = 0
        """Bucket all-reduces so far (what a benchmark or test counts)."""
        self.checked = False
        """Some bucket was reduced (and checked) since the last :meth:`take_flag` or :meth:`reset`."""
        self._found: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def attach(cls, model: nn.Module) -> CheckedAverage | None:
        """The hook's state on ``model``: registered once per model (another Accumulator on it shares it); None
        when the model already has a comm hook of its own, which DDP allows only one of."""
        existing = getattr(model, "_distaccum_checked_average", None)
        if isinstance(existing, CheckedAverage):
            return existing
        if getattr(model, "_comm_hooks", None):
            return None
        state = cls(getattr(model, "process_group", None))
        try:
            model.register_comm_hook(state, _checked_average_hook)  # type: ignore[operator]
        except RuntimeError:  # a builtin hook (register_builtin_comm_hook) is not listed in _comm_hooks
            hooks = getattr(model, "_comm_hooks", None)
            if hooks and hooks[-1][1] is state:
                hooks.pop()
            return None
        model._distaccum_checked_average = state  # type: ignore[assignment]
        return state

    def _average(self, done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = done.value()[0]
        found = self._found.get(reduced.device)
        if found is None:
            found = self._found[reduced.device] = torch.zeros(1, dtype=torch.float32, device=reduced.device)
        inverse = 1.0 / self.world_size
        if reduced.dtype == torch.float64 and float(torch.tensor(inverse, dtype=torch.float32)) != inverse:
            reduced.div_(self.world_size)  # the kernel's fp32 factor would round a float64 gradient
            inverse = 1.0
        factor = torch.full((1,), inverse, dtype=torch.float32, device=reduced.device)
        torch._amp_foreach_non_finite_check_and_unscale_([reduced], found, factor)
        self.checked = True
        return reduced

    def take_flag(self) -> torch.Tensor | float:
        """Nonzero when a checked bucket held a NaN/inf since the last call (a tensor on the buckets' device: read
        with the window's scalars); starts the next window unchecked."""
        found: torch.Tensor | float = 0.0
        for flag in self._found.values() if self.checked else ():
            found = flag.sum() if isinstance(found, float) else found + flag.sum().to(found.device)  # new tensors
        self.reset()
        return found

    def reset(self) -> None:
        """Forget what was checked (the window ended, or its gradients were reduced another way)."""
        for flag in self._found.values():
            flag.zero_()
        self.checked = False


def _checked_average_hook(state: CheckedAverage, bucket: torch_dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The comm hook: DDP's average, with the non-finite check folded into its division."""
    state.reductions += 1
    future = torch_dist.all_reduce(bucket.buffer(), group=state.group, async_op=True).get_future()
    return future.then(state._average)


# DDP compares a hook's annotations with its own classes, and postponed annotations are strings.
_checked_average_hook.__annotations__ = {}
