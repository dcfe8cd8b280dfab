"""When backward reduces the gradients: ``Accumulator(grad_sync=...)``, one mode per accumulator.

=========== ======================================================= ===================================================
mode        what is reduced, when                                   held per rank during the window
=========== ======================================================= ===================================================
boundary    nothing inside the window; the boundary backward        a whole unsharded gradient (DDP: in ``.grad``;
            reduces once (DDP all-reduce, FSDP reduce-scatter, HSDP  FSDP1/2: in private buffers)
            reduce-scatter + replica all-reduce)
sharded     FSDP1/2 reduce-scatter in every backward; HSDP (FSDP2)  this rank's shard of the sum (HSDP: the shard
            all-reduces across replicas at the boundary only        group's partial sum, in FSDP2's buffer)
every       DDP all-reduce / FSDP reduce-scatter (+ HSDP replica    the reduced gradient (FSDP: the shard)
            all-reduce) in every backward
=========== ======================================================= ===================================================

``"boundary"`` is every wrapper's default: the fewest collectives (DDP syncing every micro-batch took 0.89 s per step
against 0.49 s with ``no_sync``, PLATFORM-NOTES) and the same result. ``"sharded"`` trades ``accum_steps - 1``
reduce-scatters per step for not holding the unsharded gradient, which is what FSDP saves memory for (torchtitan
reduce-scatters every micro-batch on purpose). ``"sharded"`` is refused where nothing is sharded (one process, DDP,
FSDP1 ``NO_SHARD``) and on FSDP1 ``HYBRID_SHARD``, which has no switch to skip the replica all-reduce alone.

The window's weighting stays one multiply at the step in every mode: its factor (``num_items``: the global item
count, known from the boundary's scalar all-reduce) is not known while the micro-steps reduce, so it cannot ride on
the wrapper's divide factor (which in fp32 also needs PREMUL_SUM, missing in gloo, or FSDP2's force-sum). On HSDP,
``"sharded"`` has a unit with a partial sum but no gradient in the boundary backward reduce-scatter zeros there
(FSDP2 would skip its replica all-reduce and lose the sum). Modes that reduce inside the window need every rank to run
the same micro-steps (``acc.iterate`` cuts uneven data so), and rule out options that reduce the window by hand at its
boundary (``auto_micro_batch``, float32 sums).
"""

from __future__ import annotations

from typing import Literal, Protocol

GradSync = Literal["boundary", "sharded", "every"]
GRAD_SYNC_MODES: tuple[GradSync, ...] = ("boundary", "sharded", "every")


class Syncing(Protocol):
    """What :func:`choose` asks of a backend (:class:`distaccum.backends.Backend`)."""

    @property
    def name(self) -> str: ...

    @property
    def default_grad_sync(self) -> GradSync: ...

    def grad_sync_refusal(self, mode: GradSync) -> str | None: ...


def choose(backend: Syncing, mode: str | None) -> GradSync:
    """``mode`` checked for ``backend``'s wrapper (None: the wrapper's default).

    Raises:
        ValueError: an unknown mode, or one this wrapper cannot run (the message names those it can).
    """
    chosen = backend.default_grad_sync if mode is None else next((m for m in GRAD_SYNC_MODES if m == mode), None)
    if chosen is None:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNC_MODES} or None (the wrapper's default), got {mode!r}")
    refusal = backend.grad_sync_refusal(chosen)
    if refusal is not None:
        raise ValueError(f"grad_sync={chosen!r} on {backend.name}: {refusal}")
    return chosen
