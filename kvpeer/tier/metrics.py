"""The tier's Prometheus metrics, reported through vLLM's offloading metrics hooks.

vLLM asks each tier class for its metric definitions before any instance exists
(``build_metric_definitions``) and then polls ``get_stats()`` every step, merging
the result into the engine's stats. :class:`TierMetrics` accumulates observations
from any of the tier's threads and hands them over, reset, on each poll.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    OffloadingCounterMetadata,
    OffloadingHistogramMetadata,
    OffloadingMetricMetadata,
)

from kvpeer.client.pull_job import PullResult

PULLED_CHUNKS = "vllm:kvpeer_pulled_chunks"
PULLED_BYTES = "vllm:kvpeer_pulled_bytes"
SERVED_CHUNKS = "vllm:kvpeer_served_chunks"
SERVED_BYTES = "vllm:kvpeer_served_bytes"
PULL_LATENCY = "vllm:kvpeer_pull_latency_seconds"
LOOKUPS = "vllm:kvpeer_lookups"
FAILURES = "vllm:kvpeer_failures"
DIRECTORY_ERRORS = "vllm:kvpeer_directory_errors"
DIRECTORY_REPLICA_FAILURES = "vllm:kvpeer_directory_replica_failures"
HANDOFFS = "vllm:kvpeer_handoffs"
PULLED_CHUNKS_BY_PATH = "vllm:kvpeer_pulled_chunks_by_path"
PULLED_BYTES_BY_PATH = "vllm:kvpeer_pulled_bytes_by_path"
SERVED_CHUNKS_BY_PATH = "vllm:kvpeer_served_chunks_by_path"
SERVED_BYTES_BY_PATH = "vllm:kvpeer_served_bytes_by_path"
SAME_HOST_FALLBACKS = "vllm:kvpeer_same_host_fallbacks"

#: Label values of the ``*_by_path`` metrics: how the rows moved.
PATHS = ("network", "same_host")

#: Label values of LOOKUPS: how a consumer's chunk lookup ended.
LOOKUP_OUTCOMES = ("hit", "miss", "timeout")

DEFINITIONS: Mapping[str, OffloadingMetricMetadata] = {
    PULLED_CHUNKS: OffloadingCounterMetadata("KV chunks pulled from peers and verified."),
    PULLED_BYTES: OffloadingCounterMetadata("Bytes of KV chunks pulled from peers and verified."),
    SERVED_CHUNKS: OffloadingCounterMetadata("KV chunks streamed to peers."),
    SERVED_BYTES: OffloadingCounterMetadata("Bytes of KV chunks streamed to peers."),
    PULL_LATENCY: OffloadingHistogramMetadata(
        "Time to pull one load job's chunks from a peer, in seconds.",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    ),
    LOOKUPS: OffloadingCounterMetadata(
        "Chunk lookups answered by the tier, by outcome (hit, miss, timeout).",
        labelnames=("outcome",),
    ),
    FAILURES: OffloadingCounterMetadata(
        "Failed operations, by reason (peer_unavailable, incompatible_peer, "
        "digest_mismatch, pull_failed, lease_expired, handoff_timeout, ...).",
        labelnames=("reason",),
    ),
    DIRECTORY_ERRORS: OffloadingCounterMetadata("Calls to the directory that failed."),
    DIRECTORY_REPLICA_FAILURES: OffloadingCounterMetadata(
        "Calls a directory replica could not answer (then tried on the next one), by endpoint.",
        labelnames=("endpoint",),
    ),
    HANDOFFS: OffloadingCounterMetadata(
        "Prefill/decode handoffs produced by this node, by outcome (pulled, timeout, reset).",
        labelnames=("outcome",),
    ),
    PULLED_CHUNKS_BY_PATH: OffloadingCounterMetadata(
        "KV chunks pulled and verified, by path (network, same_host).", labelnames=("path",)
    ),
    PULLED_BYTES_BY_PATH: OffloadingCounterMetadata(
        "Bytes of KV chunks pulled and verified, by path (network, same_host).",
        labelnames=("path",),
    ),
    SERVED_CHUNKS_BY_PATH: OffloadingCounterMetadata(
        "KV chunks served to peers, by path (network: streamed; same_host: mapped "
        "for a same-host copy).",
        labelnames=("path",),
    ),
    SERVED_BYTES_BY_PATH: OffloadingCounterMetadata(
        "Bytes of KV chunks served to peers, by path (network, same_host).",
        labelnames=("path",),
    ),
    SAME_HOST_FALLBACKS: OffloadingCounterMetadata(
        "Pulls that used the network instead of the same-host fast path (wholly or in "
        "part), by reason (other_host, no_region, open_failed, identity_mismatch, "
        "identity_changed, region_truncated, bad_offsets, holder_refused, ...).",
        labelnames=("reason",),
    ),
}


def count_pulled_paths(tier_metrics: TierMetrics, result: PullResult, loaded: int) -> None:
    """Count one pull's loaded rows by path, and why the fast path was left, if it was."""
    same_rows, same_bytes = result.same_host_rows, result.same_host_bytes
    tier_metrics.count(PULLED_CHUNKS_BY_PATH, same_rows, "same_host")
    tier_metrics.count(PULLED_BYTES_BY_PATH, same_bytes, "same_host")
    tier_metrics.count(PULLED_CHUNKS_BY_PATH, loaded - same_rows, "network")
    tier_metrics.count(PULLED_BYTES_BY_PATH, result.bytes_loaded - same_bytes, "network")
    if result.fallback:
        tier_metrics.count(SAME_HOST_FALLBACKS, 1, result.fallback)


def count_served(
    tier_metrics: TierMetrics,
    now: tuple[int, int, int, int],
    before: tuple[int, int, int, int],
) -> None:
    """Count what the chunk server served since ``before``: (chunks, bytes) streamed, then mapped."""
    chunks, nbytes, mapped_chunks, mapped_bytes = (a - b for a, b in zip(now, before, strict=True))
    tier_metrics.count(SERVED_CHUNKS, chunks + mapped_chunks)
    tier_metrics.count(SERVED_BYTES, nbytes + mapped_bytes)
    tier_metrics.count(SERVED_CHUNKS_BY_PATH, chunks, "network")
    tier_metrics.count(SERVED_BYTES_BY_PATH, nbytes, "network")
    tier_metrics.count(SERVED_CHUNKS_BY_PATH, mapped_chunks, "same_host")
    tier_metrics.count(SERVED_BYTES_BY_PATH, mapped_bytes, "same_host")


class TierMetrics:
    """Thread-safe accumulator of the tier's observations.

    Any thread may call :meth:`count` and :meth:`observe`; vLLM's scheduler thread
    (or its tier-poll thread) calls :meth:`take` through ``get_stats``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[str, ...]], float] = {}
        self._histograms: dict[str, list[float]] = {}

    def count(self, name: str, value: float = 1, *labels: str) -> None:
        if not value:
            return
        key = (name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms.setdefault(name, []).append(value)

    def take(self) -> OffloadingConnectorStats | None:
        """Observations since the last call, as vLLM stats; None when there are none."""
        with self._lock:
            counters, self._counters = self._counters, {}
            histograms, self._histograms = self._histograms, {}
        if not counters and not histograms:
            return None
        stats = OffloadingConnectorStats()
        for (name, labels), value in counters.items():
            stats.increase_counter(name, value, labels)
        for name, values in histograms.items():
            for value in values:
                stats.observe_histogram(name, value)
        return stats
