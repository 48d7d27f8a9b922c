"""Cross-TP reuse end to end: the right bytes or none.

Each node fills its primary rows the way vLLM's workers would for its own
tensor-parallel size (kvpeer.sim.canonical runs vLLM's canonical page mappings),
and checks the rows it loads against the rows *it* would have computed. With
``canonical_layout`` a TP=2 producer's rows are what a TP=1 consumer would have
written, so they are accepted byte for byte; without it the nodes' fingerprints
differ and not a byte moves.
"""

from __future__ import annotations

import pytest

from kvpeer.sim.rows import chunk_keys
from tests.support.cluster import hexkeys

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("producer_tp", [2, 4])
def test_canonical_rows_from_a_tp_n_producer_feed_a_tp1_consumer(cluster, producer_tp):
    producer = cluster.node("producer", tp_size=producer_tp, rows="canonical")
    consumer = cluster.node(
        "consumer", tp_size=1, rows="canonical", tier={"peers": [producer.endpoint]}
    )
    assert producer.info["fingerprint"] == consumer.info["fingerprint"]
    assert producer.info["chunk_bytes"] == consumer.info["chunk_bytes"]
    keys = chunk_keys(f"cross-tp-{producer_tp}", 6)
    producer.call("store", keys=hexkeys(keys))

    report = consumer.call("request", keys=hexkeys(keys))

    assert report["hit_chunks"] == 6
    assert report["verified_chunks"] == 6 and report["wrong_chunks"] == []


def test_direct_layout_nodes_of_different_tp_exchange_nothing(cluster):
    producer = cluster.node("producer", tp_size=2, rows="direct", canonical_layout=False)
    consumer = cluster.node(
        "consumer",
        tp_size=1,
        rows="direct",
        canonical_layout=False,
        tier={"peers": [producer.endpoint]},
    )
    assert producer.info["fingerprint"] != consumer.info["fingerprint"]
    keys = chunk_keys("direct-tp", 4)
    producer.call("store", keys=hexkeys(keys))

    report = consumer.call("request", keys=hexkeys(keys))

    assert report["hit_chunks"] == 0 and report["stored_chunks"] == 4  # recomputed, not loaded
    stats = consumer.call("stats")
    assert "incompatible_peer" in stats.get("vllm:kvpeer_failures", {}), stats
