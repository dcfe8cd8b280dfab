"""The ``with`` block of one micro-step, which hands its end (and a failure of the wrapper's sync context) back
to what opened it: :meth:`distaccum.Accumulator.micro_step`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Opener = TypeVar("Opener")
EndMicroStep = Callable[[bool, BaseException | None], bool]
"""Told when a micro-step ends (is it the boundary; the error it raised, if any); True: the error is taken care of."""


class MicroStep(Generic[Opener]):
    """The ``with`` block of one micro-step (a plain class rather than a generator: it is entered every micro-batch).

    Args:
        opener: what ``with ... as`` gives (the accumulator).
        end: called once when the block ends (or its sync context fails to enter or exit).
        boundary: whether this micro-step ends the window.
        no_sync: the wrapper's context around the forward and backward (None: nothing to enter).
    """

    __slots__ = ("_boundary", "_end", "_no_sync", "_opener")

    def __init__(
        self,
        opener: Opener,
        end: EndMicroStep,
        boundary: bool,
        no_sync: contextlib.AbstractContextManager[None] | None,
    ) -> None:
        self._opener = opener
        self._end = end
        self._boundary = boundary
        self._no_sync = no_sync

    def __enter__(self) -> Opener:
        if self._no_sync is not None:
            try:
                self._no_sync.__enter__()
            except BaseException as error:  # no __exit__ follows: abandon the micro-step here
                self._end(self._boundary, error)
                raise
        return self._opener

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> bool:
        if self._no_sync is not None:
            try:  # restores the wrapper's sync flag as it found it; a generator's re-raise of `error` returns False
                self._no_sync.__exit__(kind, error, traceback)
            except BaseException as raised:  # the wrapper's own failure: the micro-step is abandoned, it propagates
                self._end(self._boundary, raised)
                raise
        return self._end(self._boundary, error)
