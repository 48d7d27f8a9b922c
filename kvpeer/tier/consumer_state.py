"""What a consumer knows about one request's chunks, kept on vLLM's ReqContext.

vLLM's scheduler asks the tier about a request's chunks one key at a time, in
prefix order, every step until the answers settle. The first time it asks about a
key, the tier queues the key and answers RETRY; a background resolver asks the
directory or peers and pins the chunks at a holder; later calls answer HIT for
pinned keys and MISS for the rest — and MISS for everything still unresolved once
the request's deadline passes, so a slow or dead peer never stalls a request.

Threads: vLLM's scheduler thread (under the manager lock) and kvpeer's resolver
and puller threads all touch this state; :attr:`lock` guards it and is held only
for dictionary updates, never across I/O.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vllm.v1.kv_offload.base import LookupResult

from kvpeer.tier.params import RequestParams


@dataclass(eq=False)
class Lease:
    """Chunks a holder pinned for us under one lease."""

    endpoint: str
    lease_id: str
    #: Keys pinned under this lease that are neither loaded nor failed yet.
    pending: set[bytes] = field(default_factory=set)
    #: Pulls in flight on this lease; it is released only when none are.
    pulls: int = 0
    released: bool = False


@dataclass(frozen=True)
class Pin:
    lease: Lease
    #: Position of the key in the holder's Lookup, which Pull refers to.
    index: int


@dataclass(eq=False)
class ConsumerState:
    """The tier's per-request consumer state."""

    params: RequestParams
    #: Seconds the request may wait for answers before its unresolved keys become MISS.
    patience_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Keys seen but not yet handed to the resolver, in the order vLLM asked.
    unsent: list[bytes] = field(default_factory=list)
    known: set[bytes] = field(default_factory=set)
    pins: dict[bytes, Pin] = field(default_factory=dict)
    misses: set[bytes] = field(default_factory=set)
    failed: set[bytes] = field(default_factory=set)
    leases: list[Lease] = field(default_factory=list)
    deadline: float | None = None
    timed_out: int = 0
    finished: bool = False

    def answer(self, key: bytes) -> LookupResult:
        """vLLM's lookup(); O(1), never blocks beyond this state's short lock."""
        with self.lock:
            if key in self.failed or key in self.misses:
                return LookupResult.MISS
            if key in self.pins:
                return LookupResult.HIT
            now = time.monotonic()
            if self.deadline is None:
                self.deadline = now + self.patience_s
            elif now >= self.deadline:
                self.misses.add(key)
                self.timed_out += 1
                return LookupResult.MISS
            if key not in self.known:
                self.known.add(key)
                self.unsent.append(key)
            return LookupResult.RETRY

    def take_unsent(self) -> list[bytes]:
        with self.lock:
            keys, self.unsent = self.unsent, []
        return keys

    @property
    def expired(self) -> bool:
        return self.finished or (self.deadline is not None and time.monotonic() >= self.deadline)

    def remaining_s(self) -> float:
        if self.deadline is None:
            return self.patience_s
        return max(0.0, self.deadline - time.monotonic())
