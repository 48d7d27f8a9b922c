"""Prefill/decode handoff between real vLLM managers in separate processes.

The producer is a prefill node whose request carries producer parameters: vLLM
then offloads the whole request (REQUEST_LEVEL) and the tier keeps those chunks
pinned until the consumer, a decode node, has pulled them or the handoff times
out. Both orderings are covered: prefill first (the usual PD proxy flow) and
decode first (the consumer asks before the producer has stored anything).
"""

from __future__ import annotations

import threading
import time

import pytest

from kvpeer.sim.rows import chunk_keys, prefix_keys
from tests.support.cluster import hexkeys, holders, wait_for

pytestmark = pytest.mark.slow


def producer(handoff_id: str) -> dict:
    return {"kvpeer": {"handoff_id": handoff_id, "role": "producer"}}


def consumer(handoff_id: str, source: str | None = None) -> dict:
    spec = {"handoff_id": handoff_id, "role": "consumer"}
    if source:
        spec["source"] = source
    return {"kvpeer": spec}


@pytest.fixture
def pd(cluster):
    """A prefill node and a decode node (and a directory both use)."""
    directory = cluster.directory()
    prefill = cluster.node("prefill", start=False, tier={"directory": directory.endpoint})
    decode = cluster.node("decode", start=False, tier={"directory": directory.endpoint})
    cluster.start(prefill, decode)
    return directory, prefill, decode


def test_prefill_first_handoff_moves_every_chunk_then_unpins(pd):
    _, prefill, decode = pd
    keys = chunk_keys("pd-prompt", 16)
    stored = prefill.call("request", keys=hexkeys(keys), params=producer("h1"))
    assert stored["stored_chunks"] == 16
    assert prefill.call("pinned") == 16, "the producer keeps the handoff pinned"

    report = decode.call("request", keys=hexkeys(keys), params=consumer("h1", prefill.endpoint))

    assert report["hit_chunks"] == 16 and report["verified_chunks"] == 16
    assert report["wrong_chunks"] == [] and report["stored_chunks"] == 0
    wait_for(lambda: prefill.call("pinned") == 0, what="the producer to unpin after the pull")
    assert prefill.call("tier_state")["open_handoffs"] == 0


def test_decode_first_handoff_waits_for_the_producer(pd):
    _, prefill, decode = pd
    keys = chunk_keys("decode-first", 12)
    result = {}
    waiting = threading.Thread(
        target=lambda: result.update(
            decode.call("request", keys=hexkeys(keys), params=consumer("h2", prefill.endpoint))
        )
    )
    waiting.start()
    time.sleep(1.0)  # the decode request is waiting; now the prefill runs
    prefill.call("request", keys=hexkeys(keys), params=producer("h2"))
    waiting.join(timeout=60)

    assert result["hit_chunks"] == 12 and result["verified_chunks"] == 12
    assert result["stored_chunks"] == 0
    wait_for(lambda: prefill.call("pinned") == 0)


def test_consumer_finds_the_producer_through_the_directory(pd):
    _, prefill, decode = pd
    keys = chunk_keys("no-source", 6)
    prefill.call("request", keys=hexkeys(keys), params=producer("h3"))

    report = decode.call("request", keys=hexkeys(keys), params=consumer("h3"))

    assert report["verified_chunks"] == 6 and report["wrong_chunks"] == []
    wait_for(lambda: prefill.call("pinned") == 0)


def test_prefix_chunks_the_producer_already_had_are_handed_off_too(pd):
    _, prefill, decode = pd
    system = prefix_keys([("system", 5)])
    full = prefix_keys([("system", 5), ("question", 4)])
    prefill.call("request", keys=hexkeys(system))  # an earlier request cached the prefix
    stored = prefill.call("request", keys=hexkeys(full), params=producer("h4"))
    assert stored["hit_chunks"] == 5 and stored["stored_chunks"] == 4
    assert prefill.call("pinned") == 9, "REQUEST_LEVEL parks the cached prefix chunks too"

    report = decode.call("request", keys=hexkeys(full), params=consumer("h4", prefill.endpoint))

    assert report["hit_chunks"] == 9 and report["verified_chunks"] == 9


def test_vllm_p2p_parameter_spellings_work_the_same(pd):
    _, prefill, decode = pd
    keys = chunk_keys("p2p-spelling", 8)
    host, port = prefill.endpoint.rsplit(":", 1)
    prefill.call("request", keys=hexkeys(keys), params={"remote_decoder": {"kv_request_id": "r1"}})
    params = {
        "remote_prefiller": {"kv_request_id": "r1", "remote_host": host, "remote_port": int(port)}
    }

    report = decode.call("request", keys=hexkeys(keys), params=params)

    assert report["verified_chunks"] == 8 and report["wrong_chunks"] == []
    wait_for(lambda: prefill.call("pinned") == 0)


def test_handoff_timeout_unpins_and_late_pulls_and_stores_fail_cleanly(cluster):
    prefill, decode = cluster.pair(
        {"name": "prefill", "tier": {"handoff_timeout_s": 2.0}},
        {"name": "decode", "tier": {"handoff_wait_s": 3.0}},
    )
    keys = chunk_keys("nobody-comes", 8)
    prefill.call("request", keys=hexkeys(keys), params=producer("h5"))
    assert prefill.call("pinned") == 8

    wait_for(lambda: prefill.call("pinned") == 0, timeout_s=20, what="the handoff to time out")
    late = decode.call("request", keys=hexkeys(keys), params=consumer("h5", prefill.endpoint))
    assert late["hit_chunks"] == 0 and late["stored_chunks"] == 8  # recomputed
    assert prefill.call("pinned") == 0, "a late lookup must not pin again"
    more = chunk_keys("late-store", 3)
    prefill.call("request", keys=hexkeys(more), params=producer("h5"))
    assert prefill.call("pinned") == 0, "a late store for an ended handoff is not parked"


def test_producer_killed_before_the_pull_makes_the_consumer_recompute(pd):
    _, prefill, decode = pd
    keys = chunk_keys("producer-dies", 8)
    prefill.call("request", keys=hexkeys(keys), params=producer("h6"))
    endpoint = prefill.endpoint
    prefill.kill()

    started = time.monotonic()
    report = decode.call("request", keys=hexkeys(keys), params=consumer("h6", endpoint))

    assert report["hit_chunks"] == 0 and report["stored_chunks"] == 8
    assert time.monotonic() - started < 30
    assert decode.call("pinned") == 0


def test_directory_keeps_nodes_of_other_fingerprints_apart(cluster):
    directory = cluster.directory()
    a = cluster.node("a", start=False, tier={"directory": directory.endpoint})
    other = cluster.node(
        "other", start=False, tier={"directory": directory.endpoint}, env={"PYTHONHASHSEED": "1"}
    )
    cluster.start(a, other)
    assert a.info["fingerprint"] != other.info["fingerprint"]
    keys = chunk_keys("seeded", 4)
    other.call("store", keys=hexkeys(keys))
    wait_for(lambda: holders(directory, other.info["fingerprint"], keys)[0])

    assert holders(directory, a.info["fingerprint"], keys) == [set()] * 4
    report = a.call("request", keys=hexkeys(keys), compute=False)
    assert report["hit_chunks"] == 0
