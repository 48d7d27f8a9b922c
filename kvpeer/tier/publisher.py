"""Keep the directory honest about what this node holds.

The tier publishes the keys of chunks that reach its primary tier (stored by vLLM
or pulled from a peer). vLLM does not tell secondary tiers when the primary tier
evicts a chunk, so published keys go stale; a stale entry costs a peer one MISS,
never wrong bytes (chunks are only read while pinned), but the directory should
not keep sending peers here. Two mechanisms withdraw what is gone:

- a peer asked for a published key and this node did not have it
  (:meth:`Publisher.withdraw_missing`, called from the serve path);
- periodic reconciliation (:meth:`Publisher.reconcile`): every
  ``reconcile_interval_s`` a small batch of published keys is checked against
  the primary tier alone, and the absent ones are withdrawn.

Threads: every method runs under vLLM's manager lock (scheduler, tier-poll or
puller callback paths take :attr:`_lock` themselves, as pull threads do not hold
the manager lock). Directory calls only queue work for the directory client's
own thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable

from vllm.v1.kv_offload.base import LookupResult, ReqContext, TierFilter
from vllm.v1.kv_offload.tiering.base import ParentManager

from kvpeer.client.directory import DirectoryClient

#: A lookup context that consults the primary tier only: no secondary tier matches.
_PRIMARY_ONLY = TierFilter(matchers=())


class Publisher:
    """What this node has told (or will tell) the directory it holds.

    Keys are recorded from the start; they reach the directory once the tier has
    joined one (:meth:`attach`), which happens just after vLLM has set up its
    prefix hash — stores before that are published then, not lost. A tier without
    a directory, or whose hash seed cannot match other nodes, never attaches, and
    :meth:`disable` drops the record.
    """

    def __init__(self, *, reconcile_interval_s: float, batch_keys: int) -> None:
        self._directory: DirectoryClient | None = None
        self._enabled = True
        self._interval_s = reconcile_interval_s
        self._batch = batch_keys
        self._lock = threading.Lock()
        self._published: dict[bytes, None] = {}
        self._rotation: deque[bytes] = deque()
        self._next_check = time.monotonic() + reconcile_interval_s
        self._ids = itertools.count()

    def attach(self, directory: DirectoryClient) -> None:
        """Publish through ``directory`` from now on, starting with every key recorded so far."""
        with self._lock:
            self._directory = directory
            backlog = list(self._published)
        if backlog:
            directory.publish(backlog)

    def disable(self) -> None:
        """Never publish (no directory, or a hash seed no other node can match)."""
        with self._lock:
            self._enabled = False
            self._published.clear()
            self._rotation.clear()

    def publish(self, keys: Iterable[bytes]) -> None:
        if not self._enabled:
            return
        fresh = []
        with self._lock:
            for key in keys:
                if key not in self._published:
                    self._published[key] = None
                    self._rotation.append(key)
                    fresh.append(key)
            directory = self._directory
        if fresh and directory is not None:
            directory.publish(fresh)

    def withdraw_missing(self, keys: Iterable[bytes]) -> None:
        """``keys`` are not in the primary tier: withdraw those that were published."""
        with self._lock:
            gone = [k for k in keys if k in self._published]
            for key in gone:
                del self._published[key]
            directory = self._directory
        if gone and directory is not None:
            directory.withdraw(gone)

    def reconcile(self, parent: ParentManager) -> None:
        """Check one batch of published keys against the primary tier, if one is due."""
        if self._directory is None or not self._interval_s or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self._interval_s
        with self._lock:
            batch = []
            while self._rotation and len(batch) < self._batch:
                key = self._rotation.popleft()
                if key in self._published:
                    batch.append(key)
        if not batch:
            return
        ctx = ReqContext(
            req_id=f"kvpeer-reconcile-{next(self._ids)}", load_tier_filter=_PRIMARY_ONLY
        )
        parent.on_new_request(ctx)
        try:
            held = [parent.lookup(key, ctx) is not LookupResult.MISS for key in batch]
        finally:
            parent.on_request_finished(ctx)
        with self._lock:
            self._rotation.extend(k for k, h in zip(batch, held, strict=True) if h)
        self.withdraw_missing([k for k, h in zip(batch, held, strict=True) if not h])

    @property
    def published_count(self) -> int:
        return len(self._published)
