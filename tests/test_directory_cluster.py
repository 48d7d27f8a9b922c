"""``kvpeer directory --store redis+cluster://...`` on a real local Redis Cluster.

The cluster (tests/support/redis_cluster.py) is 3 primaries with a replica each,
created with ``redis-cli --cluster create``; the directories are real ``kvpeer
directory`` processes and the nodes real :class:`DirectoryClient`s. The directory
has a shard per primary; the primary that owns a node's shard is SIGKILLed under
traffic and its replica takes over.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from redis.crc import key_slot

from kvpeer.api.errors import ConfigError
from kvpeer.client.directory import DirectoryClient
from kvpeer.server.directory import redis_layout
from kvpeer.server.directory.redis_store import RedisStore
from kvpeer.server.directory.store import MisconfiguredStoreError, StoreUnavailableError
from kvpeer.server.directory.stores import open_store
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.directory import (
    FP_A,
    FP_B,
    RPC_TIMEOUT_S,
    keys,
    refused_at_start,
    wait_until,
)
from tests.support.redis_cluster import RedisCluster

#: The control prefix; each shard's prefix carries its own hash tag.
CONTROL = b"{kvpeer}:"
SHARDS = 3  # one per primary


def shard_key(node_id: str) -> bytes:
    """The prefix of the shard that holds ``node_id``: its slot's primary takes its writes."""
    prefixes = redis_layout.shard_prefixes(CONTROL, SHARDS, cluster=True)
    return prefixes[redis_layout.shard_of(node_id, SHARDS)]


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(replicas_each=1) as started:
        yield started


def stub(process: DirectoryProcess) -> directory_pb2_grpc.DirectoryStub:
    return directory_pb2_grpc.DirectoryStub(grpc.insecure_channel(process.endpoint))


def holders(s, ks: list[bytes], fp=FP_A) -> list[set[tuple[str, int]]]:
    response = s.Locate(pb.LocateRequest(fingerprint=fp.digest, keys=ks), timeout=RPC_TIMEOUT_S)
    nodes = [(n.node_id, n.epoch) for n in response.nodes]
    return [{nodes[i] for i in row.nodes} for row in response.holders]


def test_every_directory_call_works_on_a_redis_cluster(cluster: RedisCluster) -> None:
    with (
        DirectoryProcess(["--store", cluster.url, "--lease-ttl", "2"], metrics=False) as one,
        DirectoryProcess(["--store", cluster.url, "--lease-ttl", "2"], metrics=False) as two,
    ):
        a, b = stub(one), stub(two)
        join = pb.JoinRequest(node_id="n1", endpoint="n1.test:7601", fingerprint=FP_A.to_proto())
        epoch = a.Join(join, timeout=RPC_TIMEOUT_S).epoch
        other = pb.JoinRequest(node_id="n2", endpoint="n2.test:7601", fingerprint=FP_B.to_proto())
        b.Join(other, timeout=RPC_TIMEOUT_S)
        a.Publish(pb.PublishRequest(node_id="n1", epoch=epoch, keys=keys(4096)), timeout=10)
        b.Withdraw(pb.WithdrawRequest(node_id="n1", epoch=epoch, keys=keys(1)), timeout=10)
        found = holders(b, keys(5))
        assert found == [set()] + [{("n1", epoch)}] * 4
        assert holders(b, keys(2), FP_B) == [set(), set()]  # namespaces stay apart
        scored = b.Score(pb.ScoreRequest(keys=keys(4096)[1:]), timeout=RPC_TIMEOUT_S).nodes
        assert {(n.node_id, n.prefix_keys) for n in scored} == {("n1", 4095), ("n2", 0)}
        listed = a.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
        assert sorted((n.node_id, n.keys) for n in listed) == [("n1", 4095), ("n2", 0)]
        assert b.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S).keys == 4095
        b.Heartbeat(pb.HeartbeatRequest(node_id="n1", epoch=epoch), timeout=RPC_TIMEOUT_S)
        a.Leave(pb.LeaveRequest(node_id="n1", epoch=epoch), timeout=RPC_TIMEOUT_S)
        assert holders(b, keys(2)) == [set(), set()]
        # n2 stops heartbeating: its lease ends (Redis's clock) and every replica agrees.
        wait_until(
            lambda: not a.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes,
            10,
            "n2's lease to end",
        )


def test_killing_the_primary_loses_no_acknowledged_entry(cluster: RedisCluster) -> None:
    """?wait=1: a publish is acknowledged once a replica has it; the replica takes over."""
    store = f"{cluster.url}?wait=1"
    with DirectoryProcess(["--store", store, "--lease-ttl", "30"], metrics=False) as directory:
        holder = DirectoryClient(
            directory.endpoint,
            node_id="holder",
            advertise="holder.test:7601",
            fingerprint=FP_A,
            rpc_timeout_s=1.0,
        )
        consumer = DirectoryClient(
            directory.endpoint,
            node_id="consumer",
            advertise="consumer.test:7601",
            fingerprint=FP_A,
            rpc_timeout_s=1.0,
            publish=False,
            locate_backoff_s=0.1,
        )
        holder.start()
        try:
            acknowledged = keys(2000, "ack")
            holder.publish(acknowledged)
            assert holder.flush(20)  # every batch answered OK: on the primary and a replica
            epoch = holder.epoch
            stop = threading.Event()
            slowest: list[float] = []

            def locate_forever() -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    consumer.locate(acknowledged[:100])
                    slowest.append(time.monotonic() - started)
                    time.sleep(0.02)

            reader = threading.Thread(target=locate_forever)
            reader.start()
            killed = cluster.kill_primary_of(shard_key("holder"))
            assert cluster.primary_of(shard_key("holder")) != killed
            wait_until(lambda: consumer.locate(acknowledged[:1]).ok, 20, "locates answer again")
            stop.set()
            reader.join(10)
            assert max(slowest) < 1.5, "a locate hung while the primary failed over"

            location = consumer.locate(acknowledged)
            assert location.ok
            lost = [k for k, row in zip(acknowledged, location.holders, strict=True) if not row]
            assert not lost, f"{len(lost)} acknowledged entries lost with the primary"
            assert {(h.node_id, h.epoch) for row in location.holders for h in row} == {
                ("holder", epoch)
            }
            # The killed node comes back as the new primary's replica: writes are
            # acknowledged again, with the same registration (no re-join).
            cluster.restart(killed)
            later = keys(50, "later")
            holder.publish(later)
            assert holder.flush(30)
            assert all(consumer.locate(later).holders)
            assert holder.epoch == epoch
        finally:
            holder.close()
            consumer.close()


def test_with_wait_a_write_no_replica_has_is_refused_not_acknowledged(
    cluster: RedisCluster,
) -> None:
    store = f"{cluster.url}?wait=1"
    with DirectoryProcess(["--store", store, "--lease-ttl", "30"], metrics=False) as directory:
        s = stub(directory)
        join = pb.JoinRequest(node_id="n1", endpoint="n1.test:7601", fingerprint=FP_A.to_proto())
        epoch = s.Join(join, timeout=RPC_TIMEOUT_S).epoch
        cluster.kill_replica_of(shard_key("n1"))
        publish = pb.PublishRequest(node_id="n1", epoch=epoch, keys=keys(3))
        with pytest.raises(grpc.RpcError) as refused:
            s.Publish(publish, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the node will retry
        assert "reached 0 of 1 replicas" in refused.value.details()


def test_cluster_urls_are_checked() -> None:
    for url, words in (
        ("redis+cluster://a:1,b/", "expected redis+cluster://host:port"),
        ("redis+cluster://a:1/3", "only db 0"),
        ("redis+cluster://a:1/?wait=x", "expected a number of replicas"),
        ("redis+cluster://a:1/?sync=1", "unknown option"),
        ("redis+cluster://a:1/?shards=0", "shards=0 in"),
        ("redis+cluster://a:1/?shards=two", "expected a number of shards"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)):
            open_store(url)
    with pytest.raises(ConfigError, match="hash tag"):
        RedisStore("redis+cluster://127.0.0.1:1/", prefix="kvpeer:")


def test_writes_spread_over_the_primaries(cluster: RedisCluster) -> None:
    """A shard per primary: each primary takes the writes of the nodes in its shard only,
    and reads merge the shards."""
    store = RedisStore(cluster.url)
    try:
        assert store.shards == SHARDS
        prefixes = redis_layout.shard_prefixes(CONTROL, SHARDS, cluster=True)
        assert len({cluster.primary_of(prefix) for prefix in prefixes}) == SHARDS
        shared = keys(1, "shared")
        epochs = {}
        for i in range(30):
            node = f"node-{i}"
            epochs[node] = store.join(node, f"{node}.test:7601", FP_A, 30.0)
            store.publish(node, epochs[node], [*keys(10, node), *shared])
        entries = [
            cluster.client_of(prefix).hlen(prefix + f"k:{FP_A.digest}".encode())
            for prefix in prefixes
        ]
        assert sum(entries) == 30 * 10 + SHARDS  # the shared key once per shard
        assert min(entries) >= 50, entries  # 30 nodes: no primary left idle
        located = store.locate(FP_A.digest, [*shared, *keys(2, "node-7")], "node-3")
        holders = [{located.nodes[i].node_id for i in row} for row in located.holders]
        assert holders == [set(epochs) - {"node-3"}, {"node-7"}, {"node-7"}]
        scored = store.score(FP_A.digest, keys(10, "node-7"))
        assert (scored[0].node_id, scored[0].prefix_keys) == ("node-7", 10)
        assert {n.node_id for n in store.list_nodes()} == set(epochs)
        assert sum(s.keys for s in store.stats()) == 30 * 11
    finally:
        store.close()


def test_replicas_of_one_directory_must_agree_on_its_shards(cluster: RedisCluster) -> None:
    RedisStore(cluster.url).close()  # creates the directory: 3 shards, one per primary
    RedisStore(f"{cluster.url}?shards=3").close()
    with pytest.raises(ConfigError, match=r"has shards=3, this replica asks for shards=2"):
        RedisStore(f"{cluster.url}?shards=2")
    stderr = refused_at_start("--store", f"{cluster.url}?shards=4")
    assert "--store: the directory in redis+cluster://" in stderr


def test_concurrent_joins_of_one_node_leave_the_last_one_current(cluster: RedisCluster) -> None:
    """Two replicas join the same node id at once, 20 times each: the highest epoch wins.

    A join overtaken by the other one's retries with a fresh epoch; one overtaken
    5 times in a row is refused ("is it running twice?"), never half-registered.
    """
    stores = [RedisStore(cluster.url), RedisStore(cluster.url)]
    try:
        epochs: list[int] = []
        refusals: list[str] = []

        def join(store: RedisStore) -> None:
            for _ in range(20):
                try:
                    epochs.append(store.join("twin", "twin.test:7601", FP_A, 30.0))
                except StoreUnavailableError as exc:
                    refusals.append(str(exc))

        threads = [threading.Thread(target=join, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        listed = stores[0].list_nodes()
        assert [(r.node_id, r.epoch) for r in listed] == [("twin", max(epochs))]
        assert len(set(epochs)) == len(epochs) == 40 - len(refusals)
        assert all("is it running twice?" in refusal for refusal in refusals)
    finally:
        for store in stores:
            store.close()


def test_a_cluster_with_an_uncovered_slot_is_refused_at_start() -> None:
    with RedisCluster() as cluster:
        cluster.uncover_slot(1234)
        with pytest.raises(ConfigError, match=r"covers 16383 of 16384 hash slots"):
            RedisStore(cluster.url)
        assert "redis-cli --cluster fix" in refused_at_start("--store", cluster.url)


def test_a_slot_lost_while_serving_makes_its_shard_unavailable_not_an_error() -> None:
    """A primary's slot goes unserved under a running directory: calls that need that
    shard get UNAVAILABLE naming the fix (the tier treats it as a miss), not INTERNAL."""
    with RedisCluster() as cluster, DirectoryProcess(["--store", cluster.url]) as directory:
        s = stub(directory)
        epoch = s.Join(
            pb.JoinRequest(node_id="a", endpoint="a.test:7601", fingerprint=FP_A.to_proto()),
            timeout=RPC_TIMEOUT_S,
        ).epoch
        publish = pb.PublishRequest(node_id="a", epoch=epoch, keys=keys(4))
        s.Publish(publish, timeout=RPC_TIMEOUT_S)
        cluster.uncover_slot(key_slot(shard_key("a")))
        for call in (
            lambda: s.Publish(publish, timeout=RPC_TIMEOUT_S),
            lambda: s.Locate(
                pb.LocateRequest(fingerprint=FP_A.digest, keys=keys(4)), timeout=RPC_TIMEOUT_S
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "not covered" in refused.value.details()
            assert "redis-cli --cluster fix" in refused.value.details()


def test_a_plain_redis_url_at_a_cluster_node_is_refused_naming_the_cluster_url() -> None:
    with RedisCluster() as cluster:
        marker_owner = cluster.primary_of(b"kvpeer:layout")
        port = next(p for p in cluster.ports if p != marker_owner)
        url = f"redis://127.0.0.1:{port}/0"
        with pytest.raises(MisconfiguredStoreError, match=r"--store redis\+cluster://"):
            RedisStore(url)
        assert "it is a Redis Cluster node" in refused_at_start("--store", url)
