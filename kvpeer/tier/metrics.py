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

PULLED_CHUNKS = "vllm:kvpeer_pulled_chunks"
PULLED_BYTES = "vllm:kvpeer_pulled_bytes"
SERVED_CHUNKS = "vllm:kvpeer_served_chunks"
SERVED_BYTES = "vllm:kvpeer_served_bytes"
PULL_LATENCY = "vllm:kvpeer_pull_latency_seconds"
LOOKUPS = "vllm:kvpeer_lookups"
FAILURES = "vllm:kvpeer_failures"
DIRECTORY_ERRORS = "vllm:kvpeer_directory_errors"
HANDOFFS = "vllm:kvpeer_handoffs"

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
    HANDOFFS: OffloadingCounterMetadata(
        "Prefill/decode handoffs produced by this node, by outcome (pulled, timeout, reset).",
        labelnames=("outcome",),
    ),
}


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
