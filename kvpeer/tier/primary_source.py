"""The chunk server's view of vLLM's primary tier.

gRPC handler threads may not touch vLLM's manager: every manager call needs its
lock, which the scheduler holds for whole steps. So a peer's lookup is only
*queued* here by the handler thread, which then waits; vLLM resolves the queue
when it calls the tier's ``serve_external_requests(parent)`` — once per engine
step and, because the tier sets ``tolerates_off_thread_polling``, from vLLM's
tier-poll thread between steps (every ``tier_poll_interval_s``, 1 ms by default).

Resolution follows vLLM's ``ParentManager`` contract for each request:
``on_new_request`` -> ``lookup`` per key -> ``create_store_job`` for the keys that
hit in this same lock hold (vLLM pins their primary rows) ->
``on_request_finished`` (always). The answer's rows are views straight into
the pinned primary rows; releasing the answer (the chunk server does so when the
lease is released or expires, never while a Pull reads it) reports the store job
finished through the outbox, and vLLM unpins the rows at its next poll.

Handoff lookups (``handoff_id`` set) are answered from the producer's parked
store jobs instead (:mod:`kvpeer.tier.handoff`); they need no manager call.

For the same-host fast path the source also describes the shared-memory file the
primary tier is mapped from (``/dev/shm/vllm_offload_<engine_id>.mmap``), found
from the primary view's own mapping (:class:`~kvpeer.api.same_host.RegionOffer`).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm.v1.kv_offload.base import LookupResult, ReqContext
from vllm.v1.kv_offload.tiering.base import JobResult, ParentManager

from kvpeer.api.same_host import RegionOffer, SharedRegion
from kvpeer.server.peer.chunk_source import ChunkSource, LookupRefused, PinnedChunks
from kvpeer.tier.handoff import HandoffRegistry
from kvpeer.tier.outbox import JobOutbox
from kvpeer.tier.rows import PrimaryRows


@dataclass(eq=False)
class _ServeRequest:
    keys: Sequence[bytes]
    hold: bool
    done: threading.Event = field(default_factory=threading.Event)
    answer: PinnedChunks | None = None
    abandoned: bool = False
    refusal: str | None = None


class PrimaryChunkSource(ChunkSource):
    """A ChunkSource whose lookups vLLM resolves in ``serve_external_requests``.

    Args:
        rows: views of the primary tier.
        outbox: where serve jobs are reported when their pins are released.
        handoffs: the producer's parked handoffs.
        on_misses: called (under the manager lock, must not block) with keys a peer
            asked for that this node does not hold: the tier withdraws the ones
            it had published.
        region: the primary tier's shared-memory file, offered to same-host peers
            (None offers none: ``same_host: off``).
    """

    def __init__(
        self,
        rows: PrimaryRows,
        outbox: JobOutbox,
        handoffs: HandoffRegistry,
        on_misses: Callable[[list[bytes]], None],
        region: RegionOffer | None = None,
    ) -> None:
        self._region = region
        self._rows = rows
        self._outbox = outbox
        self._handoffs = handoffs
        self._on_misses = on_misses
        self._lock = threading.Lock()
        self._queue: deque[_ServeRequest] = deque()
        self._ids = itertools.count()
        self._closed = False

    @property
    def chunk_bytes(self) -> int:
        return self._rows.chunk_bytes

    # -- gRPC handler threads -------------------------------------------------

    def region(self) -> SharedRegion | None:
        return self._region.get() if self._region is not None else None

    def lookup(
        self,
        keys: Sequence[bytes],
        *,
        hold: bool,
        handoff_id: str = "",
        wait_s: float = 0.0,
        timeout_s: float = 5.0,
    ) -> PinnedChunks:
        if handoff_id:
            return self._handoffs.lookup(handoff_id, keys, hold=hold, wait_s=wait_s)
        request = _ServeRequest(keys, hold)
        with self._lock:
            if self._closed:
                raise LookupRefused("UNAVAILABLE", "the node is shutting down")
            self._queue.append(request)
        if not request.done.wait(timeout_s):
            with self._lock:
                if not request.done.is_set():
                    request.abandoned = True
                    raise LookupRefused(
                        "UNAVAILABLE",
                        f"lookup not served within {timeout_s:g}s: the node's engine is not "
                        "polling its tiers (busy, paused or stopping)",
                    )
        if request.refusal is not None:
            raise LookupRefused("UNAVAILABLE", request.refusal)
        assert request.answer is not None
        return request.answer

    # -- vLLM's scheduler or tier-poll thread, under the manager lock ---------

    @property
    def has_queued(self) -> bool:
        return bool(self._queue)

    def serve(self, parent: ParentManager) -> None:
        """Resolve every queued lookup through ``parent``; never blocks."""
        if not self._queue:
            return
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
        for request in batch:
            answer = self._resolve(parent, request)
            with self._lock:
                if request.abandoned:
                    answer.release()
                else:
                    request.answer = answer
                    request.done.set()

    def _resolve(self, parent: ParentManager, request: _ServeRequest) -> PinnedChunks:
        ctx = ReqContext(req_id=f"kvpeer-serve-{next(self._ids)}")
        parent.on_new_request(ctx)
        try:
            hits = [parent.lookup(key, ctx) is LookupResult.HIT for key in request.keys]
            misses = [key for key, hit in zip(request.keys, hits, strict=True) if not hit]
            if misses:
                self._on_misses(misses)
            if not request.hold or len(misses) == len(hits):
                return PinnedChunks(hits, {})
            hit_keys = list(
                dict.fromkeys(k for k, hit in zip(request.keys, hits, strict=True) if hit)
            )
            job = parent.create_store_job(hit_keys, ctx)
            chunk_of = dict(zip(hit_keys, (int(c) for c in job.chunk_ids), strict=True))
            rows = {
                i: self._rows.row(chunk_of[key]) for i, key in enumerate(request.keys) if hits[i]
            }
        finally:
            parent.on_request_finished(ctx)
        return PinnedChunks(hits, rows, lambda: self._unpin(job.job_id, rows))

    def _unpin(self, job_id: int, rows: dict[int, memoryview]) -> None:
        for view in rows.values():
            self._rows.release(view)
        self._outbox.put(JobResult(job_id, True))

    def close(self) -> None:
        """Refuse new lookups and fail the queued ones."""
        with self._lock:
            self._closed = True
            batch = list(self._queue)
            self._queue.clear()
        for request in batch:
            request.refusal = "the node is shutting down"
            request.done.set()
