"""The ``with`` block of one micro-step, which hands its end (and a failure of the wrapper's sync context) back
to what opened it: :meth:`distaccum.Accumulator.micro_step`."""

from __future__ import annotations

import contextlib
from typing import Any, Generic, Protocol, TypeVar


class EndsMicroSteps(Protocol):
    """What opens micro-steps: told when one ends, and whether it raised (True: the error is taken care of)."""

    def _end_micro_step(self, boundary: bool, error: BaseException | None) -> bool: ...


Opener = TypeVar("Opener", bound=EndsMicroSteps)


class MicroStep(Generic[Opener]):
    """The ``with`` block of one micro-step (a plain class rather than a generator: it is entered every micro-batch)."""

    __slots__ = ("_acc", "_boundary", "_no_sync")

    def __init__(self, acc: Opener, boundary: bool, no_sync: contextlib.AbstractContextManager[None] | None):
        self._acc, self._boundary, self._no_sync = acc, boundary, no_sync

    def __enter__(self) -> Opener:
        if self._no_sync is not None:
            try:
                self._no_sync.__enter__()
            except BaseException as error:  # no __exit__ follows: abandon the micro-step here
                self._acc._end_micro_step(self._boundary, error)
                raise
        return self._acc

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> bool:
        if self._no_sync is not None:
            try:  # restores the wrapper's sync flag as it found it; a generator's re-raise of `error` returns False
                self._no_sync.__exit__(kind, error, traceback)
            except BaseException as raised:  # the wrapper's own failure: the micro-step is abandoned, it propagates
                self._acc._end_micro_step(self._boundary, raised)
                raise
        return self._acc._end_micro_step(self._boundary, error)
