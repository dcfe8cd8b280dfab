"""The order in which a benchmark runs its methods in each round: a Williams design.

Interleaving methods round by round makes machine drift hit all of them alike, but a method's time also depends
on the method that ran just before it on the same process (caches, the allocator's state): measured on the 2-rank
MLP at k = 1, swapping two adjacent methods in a rotating order moved their ratio from 1.035 to 0.939 in CPU time.
A rotation keeps every method behind the same neighbour, so that carry-over never averages out. A Williams design
(a Latin square balanced for first-order carry-over) puts every method in every position equally often and right
after every other method equally often: ``n`` rows for an even number of methods, ``2n`` for an odd one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ORDER", "design_note", "round_order", "williams_rows"]

ORDER = "williams"
"""``environment["round_order"]`` of a bench run that used :func:`round_order`."""


def williams_rows(count: int) -> list[list[int]]:
    """The rows of a Williams design for ``count`` methods, as lists of method indices.

    Row 0 is ``0, 1, n-1, 2, n-2, ...``; row ``r`` adds ``r`` to each entry (mod ``n``). For an even ``n`` each
    ordered pair of different methods is adjacent in exactly one row; for an odd ``n`` the mirrored rows are added
    and each pair is adjacent in exactly two.

    Raises:
        ValueError: ``count`` is below 1.
    """
    if count < 1:
        raise ValueError(f"williams_rows needs at least one method, got count={count}")
    first = [0]
    low, high = 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    rows = [[(index + shift) % count for index in first] for shift in range(count)]
    if count % 2:
        rows += [row[::-1] for row in rows]
    return rows


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The methods of round ``round_index`` in the order they run (the design's rows in turn; the same on every
    rank). A run balances carry-over exactly when its rounds are a multiple of ``len(williams_rows(len(names)))``."""
    rows = williams_rows(len(names))
    return [names[index] for index in rows[round_index % len(rows)]]


def design_note(results: dict[str, Any]) -> str:
    """What a bench report says of its order: the design's length and whether the rounds balance it exactly
    (results from before the design, ``environment["round_order"]`` absent: the order rotated)."""
    config = results["config"]
    if results["environment"].get("round_order") != ORDER:
        return "order rotating"
    rows, rounds = len(williams_rows(len(config["methods"]))), config["rounds"]
    whole = (
        f"{rounds // rows} whole cycles"
        if rounds % rows == 0
        else f"not a whole number of cycles: {rounds % rows} over"
    )
    return f"order balanced for carry-over (Williams design of {rows} rows; {whole})"
