"""Promotions: pull pinned chunks from their holders straight into vLLM's primary rows.

vLLM calls ``submit_load(job)`` under its lock with primary rows already allocated
(``job.chunk_ids``, parallel to ``job.keys``). The tier hands the job to
:class:`Puller`, whose threads stream each key's chunk from the holder that pinned
it into its row, verifying digests as they go (``PeerClient.pull``). The job is
reported with ``successful_keys`` when only some rows arrived whole and verified;
vLLM frees the others and the request recomputes them. A key whose load failed
is remembered on the request so its lookup answers MISS from then on (otherwise
vLLM would promote it again every step).

Pull threads write primary rows without the manager lock, as vLLM's contract
allows for the rows of a submitted job, and never need that lock to finish,
because ``drain_jobs`` waits for them while vLLM holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from vllm.v1.kv_offload.tiering.base import JobResult, TransferJob

from kvpeer.client.peer import PeerClientPool, PullTarget
from kvpeer.tier import metrics
from kvpeer.tier.consumer_state import ConsumerState, Lease
from kvpeer.tier.metrics import TierMetrics
from kvpeer.tier.outbox import JobOutbox
from kvpeer.tier.rows import PrimaryRows

log = logging.getLogger(__name__)


class Puller:
    """Runs load jobs on up to ``max_concurrent`` threads (idle threads sleep)."""

    def __init__(
        self,
        *,
        pool: PeerClientPool,
        rows: PrimaryRows,
        outbox: JobOutbox,
        tier_metrics: TierMetrics,
        release_lease: Callable[[Lease], None],
        on_loaded: Callable[[list[bytes]], None],
        streams: int,
        timeout_s: float,
        max_concurrent: int,
    ) -> None:
        self._pool = pool
        self._rows = rows
        self._outbox = outbox
        self._metrics = tier_metrics
        self._release_lease = release_lease
        self._on_loaded = on_loaded
        self._streams = streams
        self._timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="kvpeer-pull")
        self._lock = threading.Lock()
        self._in_flight: set[Future[None]] = set()
        self._cancel = threading.Event()

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    def submit(self, job: TransferJob, state: ConsumerState | None) -> None:
        """Start ``job``; returns at once. Called under vLLM's manager lock."""
        groups: dict[Lease, list[tuple[bytes, int, int]]] = {}
        unpinned: list[bytes] = []
        keys = [bytes(k) for k in job.keys]
        if state is None:
            unpinned = keys
        else:
            with state.lock:
                for key, chunk_id in zip(keys, job.chunk_ids, strict=True):
                    pin = state.pins.get(key)
                    if pin is None or pin.lease.released:
                        unpinned.append(key)
                        continue
                    groups.setdefault(pin.lease, []).append((key, int(chunk_id), pin.index))
                for lease in groups:
                    lease.pulls += 1
        future = self._executor.submit(self._run, job, state, groups, unpinned)
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)

    def drain(self) -> None:
        """Wait for every submitted job to finish and be in the outbox; aborts none."""
        with self._lock:
            futures = list(self._in_flight)
        wait(futures)

    def close(self, timeout_s: float) -> None:
        """Stop pulls within ``timeout_s``: in-flight pulls are cancelled between rows."""
        with self._lock:
            futures = list(self._in_flight)
        if wait(futures, timeout=timeout_s).not_done:
            self._cancel.set()
            wait(futures, timeout=timeout_s)
        self._executor.shutdown(wait=True, cancel_futures=False)

    # -- pull threads ---------------------------------------------------------

    def _run(
        self,
        job: TransferJob,
        state: ConsumerState | None,
        groups: dict[Lease, list[tuple[bytes, int, int]]],
        unpinned: list[bytes],
    ) -> None:
        started = time.monotonic()
        loaded: list[bytes] = []
        failed = list(unpinned)
        if unpinned:
            self._metrics.count(metrics.FAILURES, len(unpinned), "not_pinned")
        for lease, items in groups.items():
            ok, bad = self._pull(lease, items)
            loaded += ok
            failed += bad
        elapsed = time.monotonic() - started
        nbytes = len(loaded) * self._rows.chunk_bytes
        if state is not None:
            self._settle(state, groups, failed, loaded)
        if not failed:
            result = JobResult(job.job_id, True, transfer_time=elapsed, transfer_bytes=nbytes)
        else:
            result = JobResult(
                job.job_id,
                False,
                successful_keys=loaded,
                transfer_time=elapsed,
                transfer_bytes=nbytes,
            )
        self._outbox.put(result)
        self._metrics.count(metrics.PULLED_CHUNKS, len(loaded))
        self._metrics.count(metrics.PULLED_BYTES, nbytes)
        self._metrics.observe(metrics.PULL_LATENCY, elapsed)
        if loaded:
            self._on_loaded(loaded)

    def _pull(
        self, lease: Lease, items: list[tuple[bytes, int, int]]
    ) -> tuple[list[bytes], list[bytes]]:
        views = [self._rows.row(chunk_id) for _, chunk_id, _ in items]
        try:
            targets = [
                PullTarget(index, key, view)
                for (key, _, index), view in zip(items, views, strict=True)
            ]
            result = self._pool.get(lease.endpoint).pull(
                lease.lease_id,
                targets,
                streams=self._streams,
                timeout_s=self._timeout_s,
                cancel=self._cancel,
            )
        finally:
            for view in views:
                self._rows.release(view)
        ok = [key for (key, _, _), hit in zip(items, result.loaded, strict=True) if hit]
        bad = [key for (key, _, _), hit in zip(items, result.loaded, strict=True) if not hit]
        metrics.count_pulled_paths(self._metrics, result, len(ok))
        if bad:
            # Rows damaged in transit get their own reason: they point at the network.
            self._metrics.count(metrics.FAILURES, result.corrupt, "digest_mismatch")
            self._metrics.count(metrics.FAILURES, len(bad) - result.corrupt, "pull_failed")
            log.warning(
                "pulled %d of %d chunks from %s: %s",
                len(ok),
                len(items),
                lease.endpoint,
                result.error,
            )
        return ok, bad

    def _settle(
        self,
        state: ConsumerState,
        groups: dict[Lease, list[tuple[bytes, int, int]]],
        failed: list[bytes],
        loaded: list[bytes],
    ) -> None:
        """Record the outcome on the request; release leases nothing else will read."""
        done = set(loaded) | set(failed)
        to_release = []
        with state.lock:
            state.failed.update(failed)
            for lease in groups:
                lease.pulls -= 1
                lease.pending -= done
                if (
                    lease.pulls == 0
                    and not lease.released
                    and (not lease.pending or state.finished)
                ):
                    lease.released = True
                    to_release.append(lease)
        for lease in to_release:
            self._release_lease(lease)
