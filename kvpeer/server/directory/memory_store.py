"""The directory's embedded store: all state in this process, lost on restart.

Clients re-join and re-publish after a directory restart, so losing the state
costs misses for a moment, never wrong answers. Follows every rule of
:class:`~kvpeer.server.directory.store.DirectoryStore`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence

from kvpeer.api.fingerprint import Fingerprint
from kvpeer.server.directory.store import (
    MAX_KEYS_PER_NODE,
    DirectoryStore,
    Located,
    NamespaceStats,
    NodeLoad,
    NodeRecord,
    NodeRef,
    ScoredNode,
    StaleEpochError,
    TooManyKeysError,
    UnknownNodeError,
    next_epoch,
    prefix_length,
    sort_scores,
)


class _Registration:
    """One (node id, epoch) and the keys it holds. Mutated only under MemoryStore's lock."""

    __slots__ = (
        "endpoint",
        "epoch",
        "expires_at",
        "fingerprint",
        "keys",
        "live",
        "load",
        "load_at",
        "node_id",
    )

    def __init__(
        self, node_id: str, endpoint: str, epoch: int, fingerprint: Fingerprint, expires_at: float
    ) -> None:
        self.node_id = node_id
        self.endpoint = endpoint
        self.epoch = epoch
        self.fingerprint = fingerprint
        self.expires_at = expires_at
        self.keys: set[bytes] = set()
        self.live = True
        self.load: NodeLoad | None = None
        self.load_at = 0.0


class MemoryStore(DirectoryStore):
    """All state in this process, under one lock.

    Layout: per namespace, a dict from key to its holder — the registration
    itself when there is one (the common case: no container object per key, which
    keeps lookups fast and the garbage collector's work small), a list of them
    when there are several. Ended registrations are marked dead at once
    (``locate`` skips them) and queued; :meth:`sweep` removes their entries in
    slices of ``sweep_batch`` keys so that one large node leaving never stalls
    lookups.
    """

    name = "memory"

    def __init__(
        self, *, sweep_batch: int = 5000, max_keys_per_node: int = MAX_KEYS_PER_NODE
    ) -> None:
        self._max_keys_per_node = max_keys_per_node
        self.store_id = "memory-" + uuid.uuid4().hex
        self._lock = threading.Lock()
        self._nodes: dict[str, _Registration] = {}
        self._index: dict[str, dict[bytes, _Registration | list[_Registration]]] = {}
        self._dead: deque[_Registration] = deque()
        self._last_epoch = 0
        self._sweep_batch = sweep_batch

    # -- helpers (call with the lock held) -------------------------------------

    def _current(self, node_id: str, epoch: int, now: float) -> _Registration:
        reg = self._nodes.get(node_id)
        if reg is None or reg.expires_at <= now:
            raise UnknownNodeError(node_id)
        if reg.epoch != epoch:
            raise StaleEpochError(node_id, epoch, reg.epoch)
        return reg

    def _end(self, reg: _Registration) -> None:
        reg.live = False
        del self._nodes[reg.node_id]
        self._dead.append(reg)

    @staticmethod
    def _unindex(
        index: dict[bytes, _Registration | list[_Registration]], key: bytes, reg: _Registration
    ) -> None:
        holders = index.get(key)
        if holders is reg:
            del index[key]
        elif isinstance(holders, list) and reg in holders:
            holders.remove(reg)
            if len(holders) == 1:
                index[key] = holders[0]

    # -- DirectoryStore --------------------------------------------------------

    def join(self, node_id: str, endpoint: str, fingerprint: Fingerprint, ttl_s: float) -> int:
        now = time.monotonic()
        with self._lock:
            old = self._nodes.get(node_id)
            if old is not None:
                self._end(old)
            self._last_epoch = next_epoch(self._last_epoch, time.time_ns() // 1000)
            reg = _Registration(node_id, endpoint, self._last_epoch, fingerprint, now + ttl_s)
            self._nodes[node_id] = reg
            return reg.epoch

    def heartbeat(
        self, node_id: str, epoch: int, ttl_s: float, load: NodeLoad | None = None
    ) -> None:
        now = time.monotonic()
        with self._lock:
            reg = self._current(node_id, epoch, now)
            reg.expires_at = now + ttl_s
            if load is not None:
                reg.load, reg.load_at = load, now

    def publish(self, node_id: str, epoch: int, keys: Sequence[bytes]) -> int:
        with self._lock:
            reg = self._current(node_id, epoch, time.monotonic())
            index = self._index.setdefault(reg.fingerprint.digest, {})
            held = reg.keys
            if len(held) + len(keys) > self._max_keys_per_node:
                adding = len(set(keys) - held)
                if len(held) + adding > self._max_keys_per_node:
                    raise TooManyKeysError(node_id, len(held), adding, self._max_keys_per_node)
            get = index.get
            for key in keys:
                if key in held:
                    continue
                held.add(key)
                holders = get(key)
                if holders is None:
                    index[key] = reg
                elif isinstance(holders, list):
                    holders.append(reg)
                else:
                    index[key] = [holders, reg]
            return len(keys)

    def withdraw(self, node_id: str, epoch: int, keys: Sequence[bytes]) -> int:
        with self._lock:
            reg = self._current(node_id, epoch, time.monotonic())
            index = self._index.get(reg.fingerprint.digest, {})
            removed = 0
            for key in keys:
                if key in reg.keys:
                    reg.keys.discard(key)
                    self._unindex(index, key, reg)
                    removed += 1
            return removed

    def locate(self, fingerprint: str, keys: Sequence[bytes], exclude_node_id: str) -> Located:
        now = time.monotonic()
        nodes: list[NodeRef] = []
        rows: list[tuple[int, ...]] = []
        append = rows.append
        # Per registration: the one-element row naming it, or () if it is left out.
        single: dict[_Registration, tuple[int, ...]] = {}

        def row_of(reg: _Registration) -> tuple[int, ...]:
            row = single.get(reg)
            if row is None:
                row = ()
                if reg.live and reg.expires_at > now and reg.node_id != exclude_node_id:
                    row = (len(nodes),)
                    nodes.append(NodeRef(reg.node_id, reg.endpoint, reg.epoch))
                single[reg] = row
            return row

        with self._lock:
            index = self._index.get(fingerprint)
            if index is None:
                return Located(nodes, [()] * len(keys))
            get = index.get
            for key in keys:
                holders = get(key)
                if holders is None:
                    append(())
                elif isinstance(holders, list):
                    append(tuple(i for reg in holders for i in row_of(reg)))
                else:
                    append(single.get(holders) or row_of(holders))
        return Located(nodes, rows)

    def score(self, fingerprint: str | None, keys: Sequence[bytes]) -> list[ScoredNode]:
        now = time.monotonic()
        with self._lock:
            scored = [
                ScoredNode(
                    reg.node_id,
                    reg.endpoint,
                    reg.epoch,
                    reg.fingerprint.digest,
                    prefix_length(reg.keys, keys),
                    reg.load,
                    now - reg.load_at if reg.load is not None else 0.0,
                )
                for reg in self._live(now)
                if fingerprint is None or reg.fingerprint.digest == fingerprint
            ]
        return sort_scores(scored)

    def leave(self, node_id: str, epoch: int) -> None:
        with self._lock:
            self._end(self._current(node_id, epoch, time.monotonic()))

    def _live(self, now: float) -> list[_Registration]:
        return [r for r in self._nodes.values() if r.expires_at > now]

    def list_nodes(self, fingerprint: str | None = None) -> list[NodeRecord]:
        now = time.monotonic()
        with self._lock:
            records = [
                NodeRecord(
                    r.node_id, r.endpoint, r.epoch, r.fingerprint, len(r.keys), r.expires_at - now
                )
                for r in self._live(now)
                if fingerprint is None or r.fingerprint.digest == fingerprint
            ]
        return sorted(records, key=lambda r: r.node_id)

    def stats(self) -> list[NamespaceStats]:
        per_namespace: dict[str, tuple[int, int]] = {}
        with self._lock:
            for reg in self._live(time.monotonic()):
                nodes, keys = per_namespace.get(reg.fingerprint.digest, (0, 0))
                per_namespace[reg.fingerprint.digest] = (nodes + 1, keys + len(reg.keys))
        return [NamespaceStats(fp, n, k) for fp, (n, k) in sorted(per_namespace.items())]

    def sweep(self) -> int:
        now = time.monotonic()
        freed = 0
        with self._lock:
            for reg in [r for r in self._nodes.values() if r.expires_at <= now]:
                self._end(reg)
            while self._dead and freed < self._sweep_batch:
                reg = self._dead[0]
                index = self._index.get(reg.fingerprint.digest, {})
                while reg.keys and freed < self._sweep_batch:
                    self._unindex(index, reg.keys.pop(), reg)
                    freed += 1
                if not reg.keys:
                    self._dead.popleft()
                    if not index:
                        self._index.pop(reg.fingerprint.digest, None)
        return freed
