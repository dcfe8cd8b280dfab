"""Where the training loop is in a window: the micro-step state machine the accumulator, ``iterate`` and ``split``
drive through its transitions.

::

    between --open--> forward --begin_backward--> reducing --end_backward--> done --close--> between
                         |                                                              ^
                         +--------------------- close (the block raised) ---------------+

``open`` decides whether the micro-step ends the window (the plan's position, ``last=True``, or the end of the data
``iterate`` saw); ``begin_backward`` marks the point after which collectives may be in flight (a rank that fails
before it can still join its peers' reduction: :meth:`distaccum.backends.Backend.join_reduction`); ``close`` ends
the ``with`` block whatever happened in it. The window's arithmetic (position, items, losses) is the ledger's
(:class:`distaccum.weighting.WindowLedger`); this object only knows which step of one micro-step the loop is in.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """The step of one micro-step the loop is in."""

    BETWEEN = "between micro-steps"
    FORWARD = "inside a micro-step, before its backward"
    REDUCING = "inside a micro-step, its backward begun (collectives may be in flight)"
    DONE = "inside a micro-step, its backward done"


class MicroSteps:
    """The micro-step state machine (see the module docstring)."""

    def __init__(self) -> None:
        self.phase = Phase.BETWEEN
        self.boundary = False
        """Whether the open micro-step (or the last one) ends the window."""
        self.run = 0
        """Micro-steps opened since the accumulator was built (``iterate`` and ``split`` check one per batch)."""
        self.data_ends = False
        """Set by ``iterate``: the next micro-step is the last of the data on some rank, so it ends the window."""
        self.splitting = False
        """``split`` is yielding the micro-batches of a window (``auto_micro_batch`` needs it to)."""

    @property
    def inside(self) -> bool:
        """Inside a ``with acc.micro_step():`` block."""
        return self.phase is not Phase.BETWEEN

    @property
    def backward_begun(self) -> bool:
        """The open micro-step's backward has begun (it may have reduced, or be reducing)."""
        return self.phase in (Phase.REDUCING, Phase.DONE)

    @property
    def backward_done(self) -> bool:
        """The open micro-step ran its one backward."""
        return self.phase is Phase.DONE

    def open(self, *, ends_window: bool) -> bool:
        """A micro-step starts; it is the window's boundary when ``ends_window`` or the data ends here. Returns
        whether it is."""
        assert self.phase is Phase.BETWEEN, self.phase
        self.boundary = ends_window or self.data_ends
        self.data_ends = False
        self.run += 1
        self.phase = Phase.FORWARD
        return self.boundary

    def begin_backward(self) -> None:
        """The micro-step's backward starts: from here on its collectives may be in flight."""
        self.phase = Phase.REDUCING

    def end_backward(self) -> None:
        """The backward ran (or, after a failure, this rank joined its peers' reduction with zeros)."""
        self.phase = Phase.DONE

    def close(self) -> None:
        """The ``with`` block ended, with or without an error."""
        self.phase = Phase.BETWEEN
