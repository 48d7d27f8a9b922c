"""Faults the tier survives, each between real processes over real sockets.

Every node is vLLM's real TieringOffloadingManager with PeerSecondaryTier over a
real /dev/shm primary tier, in its own process (kvpeer.sim.node); directories are
real ``kvpeer directory`` processes, Redis a real ``redis-server``, and link faults
come from a fault-injecting TCP relay (kvpeer.sim.relay) between consumer and
holder. Rows derive from their keys, so every row a node loads is checked byte
for byte against what its holder computed.

After each fault: no row reported loaded is wrong (``wrong_chunks == []``), no
pins, jobs or open row views are left on the survivors (``idle``), and the
survivors still serve a fresh request.

Faults covered elsewhere (tests/test_tier_cluster.py, tests/test_tier_handoff.py):
holder SIGKILLed mid-pull, directory (memory store) killed and restarted, reset
during a pull, consumer shut down gracefully mid-pull, PD producer killed before
the pull. Node start-up (importing vLLM) dominates the time here, so tests that
only change a link's faults share one holder and consumer (the ``link`` fixture)
and the two Redis tests share one cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kvpeer.sim.directory import DirectoryProcess
from kvpeer.sim.node import NodeProcess
from kvpeer.sim.relay import Faults, Relay
from kvpeer.sim.rows import chunk_keys, keyed_row
from kvpeer.tier import metrics
from tests.support.cluster import REMOTE, Cluster, free_port, hexkeys, idle, published, wait_for
from tests.support.faults import StallingServer, counter, registrations, run_request
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow

CHUNK = 2 << 20
#: Nodes with 2 MiB rows (Llama-3-8B KV of 16 tokens) and room for 96 of them.
BIG = {"shape": "llama3-8b", "cpu_bytes": 96 * CHUNK}
#: The shared holder's lease: long enough for any pull here, short enough to wait out.
HOLDER_LEASE_S = 5.0


def fresh_request_is_served(holder: NodeProcess, consumer: NodeProcess, name: str) -> None:
    """The survivors still share: ``consumer`` loads a new prompt ``holder`` stored."""
    keys = chunk_keys(name, 4)
    holder.call("store", keys=hexkeys(keys))
    report = consumer.call("request", keys=hexkeys(keys))
    assert report["verified_chunks"] == 4 and report["wrong_chunks"] == [], report


# -- one holder and one consumer joined by a relay ------------------------------


@dataclass
class Link:
    """A holder reached only through ``relay``: its advertised address and the consumer's peer."""

    cluster: Cluster
    relay: Relay
    holder: NodeProcess
    consumer: NodeProcess


@pytest.fixture(scope="module")
def shared_link(tmp_path_factory: Any) -> Iterator[Link]:
    """Started once for the link tests (node start-up is the expensive part)."""
    cluster = Cluster(tmp_path_factory.mktemp("link"))
    port = free_port()
    relay = Relay(f"127.0.0.1:{port}")
    try:
        holder = cluster.node(
            "holder",
            start=False,
            **BIG,
            tier={
                "listen": f"127.0.0.1:{port}",
                "advertise": relay.endpoint,
                **REMOTE,
                "lease_ttl_s": HOLDER_LEASE_S,
            },
        )
        consumer = cluster.node("consumer", start=False, **BIG, tier={"peers": [relay.endpoint]})
        cluster.start(holder, consumer)
        yield Link(cluster, relay, holder, consumer)
    finally:
        cluster.close()
        relay.stop()


@pytest.fixture
def link(shared_link: Link) -> Iterator[Link]:
    """The shared link, healthy and idle; its faults are cleared again afterwards."""
    wait_for(lambda: idle(shared_link.holder, shared_link.consumer), what="an idle link")
    try:
        yield shared_link
    finally:
        shared_link.relay.set_faults(down=Faults(), up=Faults())


def test_slow_link_completes_with_exact_bytes(link):
    keys = chunk_keys("slow-link", 16)  # 32 MiB: ~1.4 s over 4 streams of 6 MB/s each
    link.holder.call("store", keys=hexkeys(keys))
    link.relay.reset_connections()  # fresh connections: the rate counts from their start
    link.relay.set_faults(up=Faults(delay_s=0.02), down=Faults(rate_bytes_per_s=6e6))
    before = link.relay.bytes_down

    report = link.consumer.call("request", keys=hexkeys(keys))

    assert report["hit_chunks"] == 16, report
    assert report["verified_chunks"] == 16 and report["wrong_chunks"] == []
    assert link.relay.bytes_down - before >= 16 * CHUNK, "the rows crossed the slow link"
    wait_for(lambda: idle(link.holder, link.consumer), what="pins released")
    fresh_request_is_served(link.holder, link.consumer, "after-slow-link")


def test_link_dropping_mid_stream_loads_only_verified_rows(link):
    keys = chunk_keys("dropped-link", 16)
    link.holder.call("store", keys=hexkeys(keys))
    link.relay.reset_connections()  # byte counts start at 0 on every connection
    # Each pull stream's connection is reset after 5 MiB: about 2.5 of its rows.
    link.relay.set_faults(down=Faults(drop_after_bytes=5 << 20))

    report = link.consumer.call("request", keys=hexkeys(keys))

    assert 0 < report["hit_chunks"] < 16, report
    assert report["verified_chunks"] == report["hit_chunks"] and report["wrong_chunks"] == []
    assert report["stored_chunks"] > 0, "the rest is recomputed"
    link.relay.set_faults(down=Faults())
    wait_for(lambda: idle(link.holder, link.consumer), what="pins released")
    fresh_request_is_served(link.holder, link.consumer, "after-dropped-link")


def test_bytes_corrupted_in_flight_are_rejected_by_the_digest(link):
    keys = chunk_keys("corrupted-link", 12)
    link.holder.call("store", keys=hexkeys(keys))
    row = keyed_row(keys[5], CHUNK)
    # Three slices from inside row 5; the relay flips the last byte of the first it
    # sees, wherever HTTP/2 framing cuts the row.
    needles = tuple(row[at : at + 48] for at in (CHUNK // 4, CHUNK // 2, 3 * CHUNK // 4))
    link.consumer.call("stats")  # start the consumer's counters from zero
    link.relay.set_faults(down=Faults(corrupt_match=needles))

    report = link.consumer.call("request", keys=hexkeys(keys))

    assert report["wrong_chunks"] == [], report
    assert report["hit_chunks"] == 5 and report["verified_chunks"] == 5, "rows 0-4, not 5"
    stats = link.consumer.call("stats")
    assert counter(stats, metrics.FAILURES, "digest_mismatch") == 1, stats
    link.relay.set_faults(down=Faults())
    wait_for(lambda: idle(link.holder, link.consumer), what="pins released")
    fresh_request_is_served(link.holder, link.consumer, "after-corruption")


def test_consumer_sigkilled_mid_pull_holder_unpins_at_lease_expiry(link):
    victim = link.cluster.node(
        "victim", **BIG, tier={"peers": [link.relay.endpoint], "pull_streams": 1}
    )
    keys = chunk_keys("abandoned-by-sigkill", 24)  # 48 MiB: 3 s at 16 MB/s
    link.holder.call("store", keys=hexkeys(keys))
    leases = link.holder.call("leases")
    link.relay.reset_connections()
    link.relay.set_faults(down=Faults(rate_bytes_per_s=16e6))
    start = link.relay.bytes_down

    with run_request(victim, keys=hexkeys(keys)) as outcome:
        wait_for(lambda: link.relay.bytes_down - start > 8 << 20, what="the pull under way")
        victim.kill()
    assert "error" in outcome, "the victim died before answering"

    wait_for(lambda: idle(link.holder), timeout_s=HOLDER_LEASE_S + 30, what="the lease to expire")
    after = link.holder.call("leases")
    assert after["live"] == 0
    assert after["expired"] > leases["expired"], "the pins ended by lease expiry"
    assert after["released"] == leases["released"], "nobody released the victim's lease"
    link.relay.set_faults(down=Faults())
    fresh_request_is_served(link.holder, link.consumer, "after-consumer-sigkill")


# -- a peer that accepts connections and never answers ----------------------------


def test_stalled_peer_costs_a_miss_not_a_hang(cluster):
    with StallingServer() as stall:
        port = free_port()
        holder = cluster.node("holder", start=False, tier={"listen": f"127.0.0.1:{port}"})
        # The tier's own timeouts: a lookup may wait 2 s, an RPC 5 s.
        consumer = cluster.node(
            "consumer",
            start=False,
            tier={
                "peers": [stall.endpoint, f"127.0.0.1:{port}"],
                "lookup_timeout_s": 2.0,
                "rpc_timeout_s": 5.0,
            },
        )
        cluster.start(holder, consumer)

        nobody = chunk_keys("held-by-nobody", 6)
        started = time.monotonic()
        report = consumer.call("request", keys=hexkeys(nobody))
        assert report["hit_chunks"] == 0 and report["stored_chunks"] == 6  # recomputed
        assert time.monotonic() - started < 20, "the stalled peer must not hold the request"
        assert stall.connections >= 1, "the consumer did dial the stalled peer"

        # A live peer still serves while the other one stalls.
        keys = chunk_keys("held-by-the-live-peer", 6)
        holder.call("store", keys=hexkeys(keys))
        report = consumer.call("request", keys=hexkeys(keys))
        assert report["verified_chunks"] == 6 and report["wrong_chunks"] == [], report

        # A PD consumer whose named source stalls gives up at the RPC deadline.
        handoff = chunk_keys("stalled-producer", 4)
        params = {"kvpeer": {"handoff_id": "h", "role": "consumer", "source": stall.endpoint}}
        started = time.monotonic()
        report = consumer.call("request", keys=hexkeys(handoff), params=params)
        assert report["hit_chunks"] == 0 and report["stored_chunks"] == 4
        assert time.monotonic() - started < 25

        stats = consumer.call("stats")
        assert counter(stats, metrics.FAILURES, "peer_unavailable") >= 1, stats
        wait_for(lambda: idle(holder, consumer), what="nothing left pinned")
        started = time.monotonic()
        consumer.stop(timeout_s=30)
        assert time.monotonic() - started < 20, "shutdown is bounded with a stalled peer"


# -- the directory on Redis ---------------------------------------------------------


@dataclass
class RedisCluster:
    """A directory on ``redis`` and two nodes joined to it."""

    redis: RedisServer
    directory: DirectoryProcess
    holder: NodeProcess
    consumer: NodeProcess


#: Directory lease: longer than any outage here, so a registration outlives it.
REDIS_DIRECTORY_LEASE_S = 20.0


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: Any) -> Iterator[RedisCluster]:
    """A directory on a Redis without persistence (a restart loses everything), two nodes."""
    redis = RedisServer(appendonly=False)
    cluster = Cluster(tmp_path_factory.mktemp("redis"))
    try:
        redis.start()
        directory = cluster.directory(lease_ttl_s=REDIS_DIRECTORY_LEASE_S, store=redis.url)
        tier = {"directory": directory.endpoint}
        holder = cluster.node("holder", start=False, tier=tier)
        consumer = cluster.node("consumer", start=False, tier=tier)
        cluster.start(holder, consumer)
        yield RedisCluster(redis, directory, holder, consumer)
    finally:
        cluster.close()
        redis.close()


def loads_all(consumer: NodeProcess, keys: list[bytes]) -> bool:
    """One request over ``keys`` that computes nothing; True if every chunk came from a peer."""
    report = consumer.call("request", keys=hexkeys(keys), compute=False)
    assert report["wrong_chunks"] == [], report
    return report["verified_chunks"] == len(keys)


def test_directory_on_redis_sigkilled_and_restarted_keeps_its_state(redis_cluster):
    directory, holder, consumer = (
        redis_cluster.directory,
        redis_cluster.holder,
        redis_cluster.consumer,
    )
    fingerprint = holder.info["fingerprint"]
    keys = chunk_keys("outlives-the-directory", 6)
    holder.call("store", keys=hexkeys(keys))
    wait_for(lambda: published(directory, holder, keys), what="the keys published")
    before = registrations(directory, fingerprint, keys)

    directory.kill()
    during = chunk_keys("stored-while-the-directory-is-down", 4)
    holder.call("store", keys=hexkeys(during))  # queued: published once it is back
    directory.start()

    # The state came back from Redis: same registration, same epoch, nothing re-published.
    assert registrations(directory, fingerprint, keys) == before
    wait_for(lambda: loads_all(consumer, keys), timeout_s=30, what="the consumer finds the keys")
    assert registrations(directory, fingerprint, keys) == before, "the holder did not re-join"
    wait_for(lambda: published(directory, holder, during), what="the queued keys published")
    assert loads_all(consumer, during)
    wait_for(lambda: idle(holder, consumer), what="nothing left pinned")


def test_redis_restarted_nodes_keep_working_and_sharing_resumes(redis_cluster):
    redis, directory, holder, consumer = (
        redis_cluster.redis,
        redis_cluster.directory,
        redis_cluster.holder,
        redis_cluster.consumer,
    )
    keys = chunk_keys("outlives-redis", 6)
    holder.call("store", keys=hexkeys(keys))
    wait_for(lambda: published(directory, holder, keys), what="the keys published")
    consumer.call("stats")  # start the consumer's counters from zero

    redis.stop()
    started = time.monotonic()
    report = consumer.call("request", keys=hexkeys(keys), compute=False)
    assert report["hit_chunks"] == 0, "nobody can be found without the directory's store"
    assert time.monotonic() - started < 20, "lookups must not wait for Redis"
    stats = consumer.call("stats")
    assert counter(stats, metrics.DIRECTORY_ERRORS) >= 1, stats
    # Both nodes keep computing, storing and hitting their own primary tier.
    local = chunk_keys("computed-while-redis-is-down", 4)
    assert holder.call("request", keys=hexkeys(local))["stored_chunks"] == 4
    assert holder.call("request", keys=hexkeys(keys))["hit_chunks"] == 6

    redis.start()  # empty: the directory forgot every node; they join again and re-publish
    wait_for(lambda: loads_all(consumer, keys), timeout_s=60, what="sharing to resume")
    wait_for(lambda: published(directory, holder, local), what="keys stored during the outage")
    assert loads_all(consumer, local)
    wait_for(lambda: idle(holder, consumer), what="nothing left pinned")


# -- a node that restarts with the same address --------------------------------------


def test_node_restarted_with_the_same_address_is_a_new_epoch_old_entries_fenced(cluster):
    # The directory's lease outlasts the test: only the new epoch can fence the old entries.
    directory = cluster.directory(lease_ttl_s=300.0)
    address = f"127.0.0.1:{free_port()}"
    tier = {"directory": directory.endpoint, "listen": address}
    holder = cluster.node("holder", start=False, tier=tier)
    consumer = cluster.node("consumer", start=False, tier={"directory": directory.endpoint})
    cluster.start(holder, consumer)
    fingerprint = holder.info["fingerprint"]
    warm = chunk_keys("pulled-before-the-restart", 4)
    old = chunk_keys("held-before-the-restart", 6)
    holder.call("store", keys=hexkeys(warm))
    holder.call("store", keys=hexkeys(old))
    wait_for(lambda: published(directory, holder, warm + old), what="the keys published")
    # The consumer now has a channel, a handshake and pull connections to the holder.
    assert consumer.call("request", keys=hexkeys(warm))["verified_chunks"] == 4
    ((node_id, old_epoch),) = registrations(directory, fingerprint, old[:1])[0]

    holder.kill()
    restarted = cluster.node("holder", tier=tier)  # same address and node id, empty tier
    assert restarted.info["node_id"] == node_id == address
    new = chunk_keys("held-after-the-restart", 5)
    restarted.call("store", keys=hexkeys(new))
    wait_for(lambda: published(directory, restarted, new), what="the restarted node joined")

    ((_, new_epoch),) = registrations(directory, fingerprint, new[:1])[0]
    assert new_epoch > old_epoch
    assert registrations(directory, fingerprint, old) == [set()] * 6, "old entries fenced"
    report = consumer.call("request", keys=hexkeys(old), compute=False)
    assert report["hit_chunks"] == 0 and report["wrong_chunks"] == []
    report = consumer.call("request", keys=hexkeys(new))
    assert report["verified_chunks"] == 5 and report["wrong_chunks"] == [], report
    wait_for(lambda: idle(restarted, consumer), what="nothing left pinned")
