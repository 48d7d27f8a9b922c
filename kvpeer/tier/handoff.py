"""The producer side of a prefill/decode handoff.

A prefill request marked as a producer (``role: producer``, or vLLM p2p's
``remote_decoder``) asks vLLM for ``REQUEST_LEVEL`` offloading, so every chunk of
the request reaches ``submit_store``, prefix hits included. Instead of reporting
those store jobs at once, the tier parks them here: while a store job is
unreported, vLLM keeps its primary rows pinned, so the consumer can pull them
straight from the primary tier.

A handoff ends, and its jobs are reported (which unpins the rows), when

- the consumer's lease on it is released or expires (``pulled``);
- ``handoff_timeout_s`` passes without a consumer (``timeout``);
- vLLM resets its cache or the tier shuts down (``reset``).

An ended handoff id is remembered for a while: a late lookup for it is refused
with a message saying how it ended, and a late store is reported at once
instead of pinning rows again.

Threads: :meth:`park` and :meth:`producer_finished` run on vLLM's scheduler
thread under the manager lock; :meth:`lookup` on gRPC handler threads; the
expiry runs on this registry's own timer thread. Nothing here takes the manager
lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm.v1.kv_offload.tiering.base import JobResult, TransferJob

from kvpeer.server.peer.chunk_source import LookupRefused, PinnedChunks
from kvpeer.tier import metrics
from kvpeer.tier.metrics import TierMetrics
from kvpeer.tier.outbox import JobOutbox
from kvpeer.tier.rows import PrimaryRows

log = logging.getLogger(__name__)

#: Ended handoff ids remembered to refuse late lookups and stores.
ENDED_MEMORY = 65536


@dataclass
class _Handoff:
    handoff_id: str
    deadline: float
    jobs: list[TransferJob] = field(default_factory=list)
    chunk_of: dict[bytes, int] = field(default_factory=dict)
    producer_done: bool = False
    leases: int = 0


class HandoffRegistry:
    """Parked store jobs of producer requests, by handoff id."""

    def __init__(
        self, rows: PrimaryRows, outbox: JobOutbox, tier_metrics: TierMetrics, timeout_s: float
    ) -> None:
        self._rows = rows
        self._outbox = outbox
        self._metrics = tier_metrics
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._open: dict[str, _Handoff] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._closed = False
        self._timer = threading.Thread(target=self._expire_loop, name="kvpeer-handoff", daemon=True)
        self._timer.start()

    # -- scheduler thread -----------------------------------------------------

    def park(self, handoff_id: str, job: TransferJob) -> bool:
        """Keep ``job`` unreported until its handoff ends. False if it already ended."""
        with self._cond:
            if self._closed or handoff_id in self._ended:
                self._metrics.count(metrics.FAILURES, len(job.keys), "late_store")
                return False
            handoff = self._open.get(handoff_id)
            if handoff is None:
                handoff = _Handoff(handoff_id, time.monotonic() + self._timeout_s)
                self._open[handoff_id] = handoff
            handoff.jobs.append(job)
            for key, chunk_id in zip(job.keys, job.chunk_ids, strict=True):
                handoff.chunk_of[bytes(key)] = int(chunk_id)
            self._cond.notify_all()
            return True

    def producer_finished(self, handoff_id: str) -> None:
        """No more stores will come for ``handoff_id``: waiting consumers answer now."""
        with self._cond:
            handoff = self._open.get(handoff_id)
            if handoff is not None:
                handoff.producer_done = True
                self._cond.notify_all()

    @property
    def open_count(self) -> int:
        return len(self._open)

    # -- gRPC handler threads -------------------------------------------------

    def lookup(
        self, handoff_id: str, keys: Sequence[bytes], *, hold: bool, wait_s: float
    ) -> PinnedChunks:
        """Answer a consumer: which of ``keys`` this handoff holds; with ``hold``, pin them.

        Waits up to ``wait_s`` for keys not parked yet, unless the producer has
        finished (decode-first ordering: the consumer asks before the prefill ends).
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                ended = self._ended.get(handoff_id)
                if ended is not None:
                    raise LookupRefused(
                        "NOT_FOUND", f"handoff {handoff_id!r} already ended ({ended})"
                    )
                if self._closed:
                    raise LookupRefused("UNAVAILABLE", "the node is shutting down")
                handoff = self._open.get(handoff_id)
                if handoff is not None and (
                    handoff.producer_done or all(k in handoff.chunk_of for k in keys)
                ):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if handoff is None:
                return PinnedChunks([False] * len(keys), {})
            hits = [key in handoff.chunk_of for key in keys]
            if not hold or not any(hits):
                return PinnedChunks(hits, {})
            rows = {
                i: self._rows.row(handoff.chunk_of[key]) for i, key in enumerate(keys) if hits[i]
            }
            handoff.leases += 1
        return PinnedChunks(hits, rows, lambda: self._lease_ended(handoff, rows))

    def _lease_ended(self, handoff: _Handoff, rows: dict[int, memoryview]) -> None:
        for view in rows.values():
            self._rows.release(view)
        with self._cond:
            handoff.leases -= 1
            if handoff.leases == 0 and self._open.get(handoff.handoff_id) is handoff:
                self._end(handoff, "pulled")

    # -- ending ---------------------------------------------------------------

    def _end(self, handoff: _Handoff, outcome: str) -> None:
        """Report the handoff's jobs (unpinning its rows). Caller holds ``_cond``."""
        del self._open[handoff.handoff_id]
        self._ended[handoff.handoff_id] = self._explain(outcome)
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        for job in handoff.jobs:
            self._outbox.put(JobResult(job.job_id, True))
        self._metrics.count(metrics.HANDOFFS, 1, outcome)
        if outcome != "pulled":
            log.info(
                "handoff %s ended: %s (%d chunks)",
                handoff.handoff_id,
                outcome,
                len(handoff.chunk_of),
            )
        self._cond.notify_all()

    def _explain(self, outcome: str) -> str:
        return {
            "pulled": "its chunks were pulled",
            "timeout": f"no consumer pulled it within handoff_timeout_s={self._timeout_s:g}s",
            "reset": "vLLM reset its KV cache",
            "shutdown": "the producer node shut down",
        }.get(outcome, outcome)

    def _expire_loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for handoff in [
                    h for h in self._open.values() if h.deadline <= now and not h.leases
                ]:
                    self._end(handoff, "timeout")
                idle = [h.deadline for h in self._open.values() if not h.leases]
                self._cond.wait(max(0.0, min(idle) - now) if idle else None)

    def end_all(self, outcome: str) -> int:
        """End every handoff no consumer is reading (vLLM reset); return how many remain leased."""
        with self._cond:
            for handoff in [h for h in self._open.values() if not h.leases]:
                self._end(handoff, outcome)
            return len(self._open)

    def close(self) -> None:
        """End every handoff without a lease and stop the timer thread."""
        self.end_all("shutdown")
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._timer.join(timeout=5)
