"""PeerSecondaryTier between real vLLM managers, one node per OS process.

Each node is vLLM's real TieringOffloadingManager built through the real
TieringOffloadingSpec path with ``module_path: kvpeer.tier`` over a real
shared-memory primary tier, driven as vLLM's scheduler drives it
(kvpeer.sim.engine); the directory is a real ``kvpeer directory`` process.
Chunk rows are derived from their keys, so every loaded row is checked byte for
byte against what its holder computed.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from kvpeer.sim.relay import Faults, Relay
from kvpeer.sim.rows import chunk_keys
from tests.support.cluster import (
    REMOTE,
    free_port,
    hexkeys,
    holders,
    idle,
    joined,
    published,
    wait_for,
)

pytestmark = pytest.mark.slow

#: A node with 2 MiB rows (Llama-3-8B KV for 16 tokens) and room for 48 of them.
BIG = {"shape": "llama3-8b", "cpu_bytes": 48 * (2 << 20)}


@pytest.mark.parametrize("transport", ["h2", "grpc"])
def test_b_reuses_a_prefix_through_static_peers(cluster, transport):
    a, b = cluster.pair(consumer={"tier": {"pull_transport": transport}})
    keys = chunk_keys("prompt-1", 12)
    assert a.call("store", keys=hexkeys(keys)) == 12

    report = b.call("request", keys=hexkeys(keys))

    assert report["hit_chunks"] == 12
    assert report["verified_chunks"] == 12 and report["wrong_chunks"] == []
    assert report["steps"] > 1, "the first lookup must answer RETRY, not block"
    assert report["stored_chunks"] == 0
    wait_for(lambda: idle(a, b), what="pins released on both nodes")


def test_static_peer_of_another_fingerprint_is_a_miss_warned_about_once(cluster):
    # Another hash seed: the holder's chunks mean something else, so its fingerprint
    # differs and it refuses the consumer's probes (IncompatiblePeerError).
    a, b = cluster.pair(holder={"env": {"PYTHONHASHSEED": "1"}})
    assert a.info["fingerprint"] != b.info["fingerprint"]
    for prompt in ("incompatible-1", "incompatible-2"):
        keys = chunk_keys(prompt, 4)
        a.call("store", keys=hexkeys(keys))

        report = b.call("request", keys=hexkeys(keys))

        assert report["hit_chunks"] == 0 and report["wrong_chunks"] == []
        assert report["stored_chunks"] == 4  # recomputed, as vLLM would

    failures = b.call("stats").get("vllm:kvpeer_failures", {})
    assert failures.get("incompatible_peer", 0) >= 2, failures  # each probe counts
    with open(b.log_path, errors="replace") as f:
        log = f.read()
    assert "lookup failed" not in log, log[-3000:]  # the failed probe is a miss, not a crash
    warned = [line for line in log.splitlines() if "incompatible peer" in line]
    assert len(warned) == 1, warned  # once per peer: it will not change
    assert a.endpoint in warned[0]


def test_prefix_found_through_the_directory_and_split_over_two_holders(cluster):
    directory = cluster.directory()
    tier = {"directory": directory.endpoint}
    a, b, c = (cluster.node(n, start=False, tier=tier) for n in "abc")
    cluster.start(a, b, c)
    keys = chunk_keys("shared-system-prompt", 8)
    a.call("store", keys=hexkeys(keys[:4]))
    c.call("store", keys=hexkeys(keys[4:]))  # C kept the tail, its head was evicted
    wait_for(lambda: published(directory, a, keys[:4]) and published(directory, c, keys[4:]))

    report = b.call("request", keys=hexkeys(keys))

    assert report["hit_chunks"] == 8
    assert report["verified_chunks"] == 8 and report["wrong_chunks"] == []
    # B now holds the prefix too and publishes it: a third replica for the next node.
    wait_for(lambda: published(directory, b, keys), what="B publishes what it pulled")
    wait_for(lambda: idle(a, b, c), what="pins released")


def test_only_the_present_run_of_the_prefix_is_loaded(cluster):
    directory = cluster.directory()
    a, b = (cluster.node(n, start=False, tier={"directory": directory.endpoint}) for n in "ab")
    cluster.start(a, b)
    keys = chunk_keys("long-prompt", 10)
    a.call("store", keys=hexkeys(keys[:6]))
    wait_for(lambda: published(directory, a, keys[:6]))

    report = b.call("request", keys=hexkeys(keys))

    assert report["hit_chunks"] == 6
    assert report["verified_chunks"] == 6 and report["wrong_chunks"] == []
    assert report["stored_chunks"] == 4  # the rest is computed, as vLLM would


def test_stale_directory_entry_is_a_miss_and_gets_withdrawn(cluster):
    directory = cluster.directory()
    tier = {"directory": directory.endpoint}
    a = cluster.node("a", start=False, tier=tier, cpu_bytes=16 * 4096)  # room for 16 chunks
    b = cluster.node("b", start=False, tier=tier)
    cluster.start(a, b)
    keys = chunk_keys("evicted", 6)
    a.call("store", keys=hexkeys(keys))
    wait_for(lambda: published(directory, a, keys))
    a.call("store", keys=hexkeys(chunk_keys("newer", 16)))  # evicts all six from A's primary
    assert published(directory, a, keys), "A cannot know yet: vLLM does not report evictions"

    report = b.call("request", keys=hexkeys(keys), compute=False)

    assert report["hit_chunks"] == 0 and report["wrong_chunks"] == []
    # A answered a lookup for keys it no longer holds: it withdraws them.
    wait_for(lambda: not any(holders(directory, a.info["fingerprint"], keys[:1])[0]))


def test_holder_killed_mid_pull_gives_partial_success_and_no_leaks(cluster):
    directory = cluster.directory(lease_ttl_s=2.0)
    port = free_port()
    with Relay(f"127.0.0.1:{port}", down=Faults(rate_bytes_per_s=24e6)) as relay:
        a = cluster.node(
            "a",
            start=False,
            **BIG,
            tier={
                "directory": directory.endpoint,
                "listen": f"127.0.0.1:{port}",
                "advertise": relay.endpoint,
                **REMOTE,
            },
        )
        b = cluster.node(
            "b", start=False, **BIG, tier={"directory": directory.endpoint, "pull_streams": 1}
        )
        cluster.start(a, b)
        keys = chunk_keys("big-prompt", 32)  # 64 MiB, ~2.7 s through the relay
        a.call("store", keys=hexkeys(keys))
        wait_for(lambda: published(directory, a, keys))
        result = {}
        pulling = threading.Thread(
            target=lambda: result.update(b.call("request", keys=hexkeys(keys)))
        )
        pulling.start()
        wait_for(lambda: relay.bytes_down > 12 << 20, what="the pull to be under way")
        a.kill()
        pulling.join(timeout=120)

    assert 0 < result["hit_chunks"] < 32, result
    assert result["verified_chunks"] == result["hit_chunks"] and result["wrong_chunks"] == []
    assert result["stored_chunks"] == 32 - result["hit_chunks"]  # the rest is recomputed
    wait_for(lambda: idle(b), what="no pins or jobs left on B")
    # The directory forgets A once its lease runs out (B, which pulled a prefix, stays).
    wait_for(lambda: not published(directory, a, keys[:1]), timeout_s=20, what="A forgotten")


def test_directory_down_degrades_to_miss_and_sharing_resumes_when_it_returns(cluster):
    directory = cluster.directory()
    a, b = (cluster.node(n, start=False, tier={"directory": directory.endpoint}) for n in "ab")
    cluster.start(a, b)
    first = chunk_keys("before-outage", 4)
    a.call("store", keys=hexkeys(first))
    wait_for(lambda: published(directory, a, first))

    directory.kill()
    during = chunk_keys("during-outage", 4)
    a.call("store", keys=hexkeys(during))
    started = time.monotonic()
    report = b.call("request", keys=hexkeys(first))
    assert report["hit_chunks"] == 0
    assert time.monotonic() - started < 8, "lookups must not wait out their deadline"

    directory.start()  # same port, empty memory store: A re-joins and re-publishes
    wait_for(lambda: published(directory, a, first + during), timeout_s=60, what="A re-publishes")
    # B's own channel reconnects on its own back-off (at most ~2 s): sharing resumes once
    # both nodes are back, which B shows by joining again.
    wait_for(lambda: joined(directory, b), timeout_s=60, what="B joins again")
    report = b.call("request", keys=hexkeys(during))
    assert report["hit_chunks"] == 4 and report["verified_chunks"] == 4


def test_reset_cache_during_a_pull_revokes_leases_without_wrong_bytes(cluster):
    port = free_port()
    with Relay(f"127.0.0.1:{port}", down=Faults(rate_bytes_per_s=24e6)) as relay:
        a = cluster.node(
            "a",
            start=False,
            **BIG,
            tier={"listen": f"127.0.0.1:{port}", "advertise": relay.endpoint, **REMOTE},
        )
        b = cluster.node(
            "b", start=False, **BIG, tier={"peers": [relay.endpoint], "pull_streams": 2}
        )
        cluster.start(a, b)
        keys = chunk_keys("reset-me", 24)
        a.call("store", keys=hexkeys(keys))
        result = {}
        pulling = threading.Thread(
            target=lambda: result.update(b.call("request", keys=hexkeys(keys)))
        )
        pulling.start()
        wait_for(lambda: relay.bytes_down > 8 << 20, what="the pull to be under way")
        a.call("reset")  # vLLM's reset_cache: drain_jobs while the pull runs
        pulling.join(timeout=120)

        assert result["wrong_chunks"] == []
        assert result["verified_chunks"] == result["hit_chunks"] < 24
        wait_for(lambda: idle(a, b), what="A's leases revoked and B's jobs settled")
        # A keeps serving after the reset.
        more = chunk_keys("after-reset", 3)
        a.call("store", keys=hexkeys(more))
        assert b.call("request", keys=hexkeys(more))["verified_chunks"] == 3


def test_consumer_shutdown_mid_pull_is_bounded_and_holder_pins_expire(cluster):
    port = free_port()
    with Relay(f"127.0.0.1:{port}", down=Faults(rate_bytes_per_s=16e6)) as relay:
        a = cluster.node(
            "a",
            start=False,
            **BIG,
            tier={
                "listen": f"127.0.0.1:{port}",
                "advertise": relay.endpoint,
                **REMOTE,
                "lease_ttl_s": 3.0,
            },
        )
        b = cluster.node("b", start=False, **BIG, tier={"peers": [relay.endpoint]})
        cluster.start(a, b)
        keys = chunk_keys("abandoned", 24)
        a.call("store", keys=hexkeys(keys))
        threading.Thread(
            target=lambda: _ignore_errors(b.call, "request", keys=hexkeys(keys)), daemon=True
        ).start()
        wait_for(lambda: relay.bytes_down > 4 << 20, what="the pull to be under way")
        started = time.monotonic()
        stopped = b.stop(timeout_s=30)
        assert time.monotonic() - started < 15
        assert stopped["shm_left"] is False
    wait_for(lambda: idle(a), timeout_s=20, what="A's lease to expire and unpin")


def _ignore_errors(fn, *args, **kwargs):
    with contextlib.suppress(Exception):
        fn(*args, **kwargs)
