"""What the directory answers for a list of keys, and the holder to pull a prefix from.

:class:`Location` is :meth:`~kvpeer.client.directory.DirectoryClient.locate`'s answer
(one row of :class:`Holder` per key asked); :func:`longest_run` picks, for an ordered
list of keys (a prompt's chunks), the holder with the longest run of consecutive keys
from the first one. Plain values: no I/O, no locks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """A node that holds a key: dial ``endpoint``; ``epoch`` is its registration."""

    node_id: str
    endpoint: str
    epoch: int


@dataclass(frozen=True)
class Location:
    """The answer to :meth:`DirectoryClient.locate`.

    ``holders[i]`` lists the holders of the i-th key asked (``[]``: nobody has it).
    ``ok`` is False when the directory could not be asked; then every entry is
    ``[]`` and ``error`` says why.
    """

    holders: list[list[Holder]]
    ok: bool
    error: str | None = None


def longest_run(
    location: Location, *, exclude: str | None = None, rng: random.Random | None = None
) -> tuple[Holder | None, int]:
    """The holder of the longest run of consecutive keys from the first, and its length.

    ``location`` answers an ordered list of keys (a prompt's chunks). Among the
    holders of key 0 (leaving out node ``exclude``), the one that also holds the
    most following keys without a gap wins; ties are broken at random (``rng``)
    so that load spreads over replicas. ``(None, 0)`` when key 0 has no holder.
    """
    rows = location.holders
    alive = {h.node_id: h for h in rows[0] if h.node_id != exclude} if rows else {}
    if not alive:
        return None, 0
    run = 1
    for row in rows[1:]:
        ids = {h.node_id for h in row}
        survivors = {node_id: h for node_id, h in alive.items() if node_id in ids}
        if not survivors:
            break
        alive = survivors
        run += 1
    candidates = sorted(alive.values(), key=lambda h: h.node_id)
    return (rng or random).choice(candidates), run
