"""The same-host fast path inside the tier: real vLLM managers in separate processes, real /dev/shm.

Two simulated nodes on this machine share a kernel, so with the default
``same_host: auto`` the consumer copies the holder's rows out of the holder's
primary-tier file instead of pulling them over TCP — for prefix reuse, for the PD
handoff (kvpeer and vLLM p2p spellings) and across TP sizes — and with
``same_host: off`` (either side) the same requests go over the network. The
nodes check every loaded row against the row they would have computed, and the
metrics say which path moved them.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvpeer.sim.node import NodeProcess
from kvpeer.sim.rows import chunk_keys
from tests.support.cluster import hexkeys, wait_for

pytestmark = pytest.mark.slow


def by_path(node: NodeProcess, metric: str) -> dict[str, float]:
    """``{path: value}`` of a ``*_by_path`` metric since the node's last stats call."""
    values: dict[str, float] = {}
    for labels, value in node.call("stats").get(metric, {}).items():
        path = "same_host" if "same_host" in labels else "network"
        values[path] = values.get(path, 0) + value
    return values


def fallbacks(stats: dict[str, Any]) -> dict[str, float]:
    return dict(stats.get("vllm:kvpeer_same_host_fallbacks", {}))


def test_prefix_reuse_uses_the_fast_path_and_is_byte_exact(cluster):
    holder, consumer = cluster.pair()
    keys = chunk_keys("same-host/prefix", 12)
    holder.call("store", keys=hexkeys(keys))
    consumer.call("stats")  # start counting from here

    report = consumer.call("request", keys=hexkeys(keys))

    assert report["verified_chunks"] == 12 and report["wrong_chunks"] == []
    assert by_path(consumer, "vllm:kvpeer_pulled_chunks_by_path") == {"same_host": 12}
    served = by_path(holder, "vllm:kvpeer_served_chunks_by_path")
    assert served.get("same_host") == 12 and not served.get("network")
    wait_for(lambda: holder.call("pinned") == 0, what="the holder to unpin after the copy")


def test_same_host_off_pulls_over_the_network(cluster):
    holder, consumer = cluster.pair(consumer={"tier": {"same_host": "off"}})
    keys = chunk_keys("same-host/off", 8)
    holder.call("store", keys=hexkeys(keys))

    report = consumer.call("request", keys=hexkeys(keys))
    stats = consumer.call("stats")

    assert report["verified_chunks"] == 8 and report["wrong_chunks"] == []
    pulled = stats["vllm:kvpeer_pulled_chunks_by_path"]
    assert sum(v for k, v in pulled.items() if "network" in k) == 8
    assert not any("same_host" in k for k in pulled)
    assert fallbacks(stats) == {}, "off is a setting, not a fallback"


def test_a_holder_that_offers_no_region_is_pulled_over_the_network(cluster):
    holder, consumer = cluster.pair(holder={"tier": {"same_host": "off"}})
    keys = chunk_keys("same-host/holder-off", 8)
    holder.call("store", keys=hexkeys(keys))

    report = consumer.call("request", keys=hexkeys(keys))
    stats = consumer.call("stats")

    assert report["verified_chunks"] == 8 and report["wrong_chunks"] == []
    assert any("no_region" in k for k in fallbacks(stats)), fallbacks(stats)


@pytest.mark.parametrize("spelling", ["kvpeer", "p2p"])
def test_pd_handoff_uses_the_fast_path(cluster, spelling):
    prefill, decode = cluster.pair()
    keys = chunk_keys(f"same-host/pd-{spelling}", 10)
    if spelling == "kvpeer":
        produce = {"kvpeer": {"handoff_id": "h1", "role": "producer"}}
        consume = {"kvpeer": {"handoff_id": "h1", "role": "consumer", "source": prefill.endpoint}}
    else:
        host, port = prefill.endpoint.rsplit(":", 1)
        produce = {"remote_decoder": {"kv_request_id": "r1"}}
        consume = {
            "remote_prefiller": {
                "kv_request_id": "r1",
                "remote_host": host,
                "remote_port": int(port),
            }
        }
    prefill.call("request", keys=hexkeys(keys), params=produce)
    decode.call("stats")

    report = decode.call("request", keys=hexkeys(keys), params=consume)

    assert report["verified_chunks"] == 10 and report["wrong_chunks"] == []
    assert by_path(decode, "vllm:kvpeer_pulled_chunks_by_path") == {"same_host": 10}
    wait_for(lambda: prefill.call("pinned") == 0, what="the producer to unpin after the copy")


def test_cross_tp_reuse_uses_the_fast_path(cluster):
    """A TP=2 holder's canonical rows are a TP=1 node's rows: a row copy is right."""
    holder, consumer = cluster.pair(
        holder={"tp_size": 2, "rows": "canonical"}, consumer={"tp_size": 1, "rows": "canonical"}
    )
    keys = chunk_keys("same-host/cross-tp", 6)
    holder.call("store", keys=hexkeys(keys))
    consumer.call("stats")

    report = consumer.call("request", keys=hexkeys(keys))

    assert report["verified_chunks"] == 6 and report["wrong_chunks"] == []
    assert by_path(consumer, "vllm:kvpeer_pulled_chunks_by_path") == {"same_host": 6}
