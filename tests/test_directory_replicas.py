"""Several ``kvpeer directory`` processes on one Redis: one state, and clients that fail over.

Real ``kvpeer directory`` processes (:class:`DirectoryProcess`) on one real
``redis-server``; callers are raw gRPC stubs and real :class:`DirectoryClient`s,
as nodes use them. A replica is SIGKILLed while a node publishes and another
locates.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from kvpeer.api.errors import ConfigError
from kvpeer.client.directory import DirectoryClient
from kvpeer.client.replicas import parse_directory_endpoints
from kvpeer.client.score import ScoreClient, ScoreError
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.directory import FP_A, RPC_TIMEOUT_S, keys, wait_until
from tests.support.redis_server import RedisServer


@pytest.fixture
def replicas() -> Iterator[list[DirectoryProcess]]:
    """Three directory processes on one Redis, lease 3 s."""
    with RedisServer() as redis:
        started = [
            DirectoryProcess(["--store", redis.url, "--lease-ttl", "3"], metrics=False)
            for _ in range(3)
        ]
        try:
            yield started
        finally:
            for process in started:
                process.close()


def stub(process: DirectoryProcess) -> directory_pb2_grpc.DirectoryStub:
    return directory_pb2_grpc.DirectoryStub(grpc.insecure_channel(process.endpoint))


@contextmanager
def holder_and_consumer(
    urls: list[str], lease_s: int
) -> Iterator[tuple[list[DirectoryProcess], DirectoryClient, DirectoryClient]]:
    """A directory replica per store URL, a node that publishes and one that only locates,
    both listing every replica."""
    started = [
        DirectoryProcess(["--store", url, "--lease-ttl", str(lease_s)], metrics=False)
        for url in urls
    ]
    endpoints = [p.endpoint for p in started]
    holder = DirectoryClient(
        endpoints, node_id="holder", advertise="holder.test:7601", fingerprint=FP_A
    )
    consumer = DirectoryClient(
        endpoints,
        node_id="consumer",
        advertise="consumer.test:7601",
        fingerprint=FP_A,
        publish=False,
    )
    try:
        yield started, holder, consumer
    finally:
        holder.close()
        consumer.close()
        for process in started:
            process.close()


def holders(s: directory_pb2_grpc.DirectoryStub, ks: list[bytes]) -> list[set[tuple[str, int]]]:
    response = s.Locate(pb.LocateRequest(fingerprint=FP_A.digest, keys=ks), timeout=RPC_TIMEOUT_S)
    nodes = [(n.node_id, n.epoch) for n in response.nodes]
    return [{nodes[i] for i in row.nodes} for row in response.holders]


def test_three_replicas_serve_one_state(replicas: list[DirectoryProcess]) -> None:
    a, b, c = (stub(p) for p in replicas)
    join = pb.JoinRequest(node_id="n1", endpoint="n1.test:7601", fingerprint=FP_A.to_proto())
    epoch = a.Join(join, timeout=RPC_TIMEOUT_S).epoch  # join through one,
    b.Publish(pb.PublishRequest(node_id="n1", epoch=epoch, keys=keys(5)), timeout=10)  # publish
    assert holders(c, keys(5)) == [{("n1", epoch)}] * 5  # through another, locate via a third
    scored = c.Score(pb.ScoreRequest(keys=keys(5)), timeout=RPC_TIMEOUT_S).nodes
    assert [(n.node_id, n.prefix_keys) for n in scored] == [("n1", 5)]
    # The epoch is one registration everywhere: a heartbeat through the third is current,
    # a stale epoch is refused by every replica, and the next join fences through all.
    c.Heartbeat(pb.HeartbeatRequest(node_id="n1", epoch=epoch), timeout=RPC_TIMEOUT_S)
    again = b.Join(join, timeout=RPC_TIMEOUT_S).epoch
    for s in (a, b, c):
        with pytest.raises(grpc.RpcError) as info:
            s.Heartbeat(pb.HeartbeatRequest(node_id="n1", epoch=epoch), timeout=RPC_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert holders(s, keys(1)) == [set()]
    # Lease expiry is decided from Redis's clock and state, not a replica's own timers:
    # the registration nobody heartbeats ends at once everywhere.
    a.Publish(pb.PublishRequest(node_id="n1", epoch=again, keys=keys(2)), timeout=10)
    assert holders(b, keys(2)) == [{("n1", again)}] * 2
    wait_until(lambda: all(holders(s, keys(2)) == [set()] * 2 for s in (a, b, c)), 10, "expiry")


def test_a_node_fails_over_when_a_replica_is_killed_mid_traffic(
    replicas: list[DirectoryProcess],
) -> None:
    endpoints = [p.endpoint for p in replicas]
    failures: list[str] = []
    holder = DirectoryClient(
        endpoints,
        node_id="holder",
        advertise="holder.test:7601",
        fingerprint=FP_A,
        rpc_timeout_s=1.0,
        publish_interval_s=0.01,
        on_replica_failure=failures.append,
    )
    consumer = DirectoryClient(
        endpoints,
        node_id="consumer",
        advertise="consumer.test:7601",
        fingerprint=FP_A,
        rpc_timeout_s=1.0,
        publish=False,
    )
    holder.start()
    try:
        published = keys(400, "kv")
        holder.publish(published[:200])
        assert holder.flush(10)
        epoch = holder.epoch
        stop = threading.Event()
        slowest: list[float] = []
        missed: list[int] = []

        def locate_forever() -> None:
            while not stop.is_set():
                started = time.monotonic()
                location = consumer.locate(published[:200])
                slowest.append(time.monotonic() - started)
                missed.append(sum(1 for row in location.holders if not row))

        reader = threading.Thread(target=locate_forever)
        reader.start()
        time.sleep(0.3)
        sticky = replicas[0]  # the replica both clients asked first
        sticky.kill()
        holder.publish(published[200:])  # writes go on through another replica
        assert holder.flush(10)
        time.sleep(0.5)
        stop.set()
        reader.join(10)

        assert holder.epoch == epoch and holder.stats()["rejoins"] == 0  # no re-join
        assert max(slowest) < 1.5, "a locate waited past its deadline"
        assert missed[-1] == 0 and sum(missed) <= 200, "locates kept answering (MISS at worst once)"
        location = consumer.locate(published)  # all 400, the last 200 sent after the kill
        assert location.ok and all(
            [(h.node_id, h.epoch) for h in row] == [("holder", epoch)] for row in location.holders
        )
        health = holder.replica_health()
        assert not health[sticky.endpoint]["up"] and health[sticky.endpoint]["failures"] >= 1
        assert all(health[p.endpoint]["up"] for p in replicas[1:])
        assert failures and set(failures) == {sticky.endpoint}
    finally:
        holder.close()
        consumer.close()


def test_directory_endpoint_lists_are_checked() -> None:
    assert parse_directory_endpoints("a:1, b:2") == ("a:1", "b:2")
    assert parse_directory_endpoints(["a:1"]) == ("a:1",)
    for raw, words in (
        ("", "no directory endpoint"),
        ("a:1,a:1", "listed twice"),
        ("a:1,b", "directory[1]: missing ':port'"),
        (7, "expected 'host:port' or a list"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_directory_endpoints(raw)


def test_a_hung_replica_costs_at_most_one_deadline_then_is_skipped(
    replicas: list[DirectoryProcess],
) -> None:
    """A replica that accepts TCP and never answers: one call waits its deadline, no more,
    for a node's DirectoryClient and for a router's ScoreClient alike."""
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        silent = f"127.0.0.1:{hung.getsockname()[1]}"
        client = DirectoryClient(
            [silent, replicas[1].endpoint],
            node_id="n",
            advertise="n.test:7601",
            fingerprint=FP_A,
            rpc_timeout_s=0.5,
        )
        client.start()
        try:
            client.publish(keys(3))
            assert client.flush(10)  # the join went to the hung one first, then on
            for _ in range(20):  # never the hung replica's deadline again, and answered
                started = time.monotonic()
                location = client.locate(keys(3))
                assert location.ok and location.holders == [[]] * 3  # held by no other node
                assert time.monotonic() - started < 0.3
                time.sleep(0.1)  # past the first down period: it is recovering, tried last
            health = client.replica_health()
            assert not health[silent]["up"] and health[replicas[1].endpoint]["up"]
            assert health[silent]["calls"] == health[silent]["failures"] >= 1
        finally:
            client.close()

        async def router() -> dict[str, dict[str, object]]:
            score = ScoreClient([silent, replicas[1].endpoint], timeout_s=0.2)
            try:
                started = time.monotonic()
                with contextlib.suppress(ScoreError):  # the hung one may take the deadline
                    await score.score(keys(3))
                assert time.monotonic() - started < 0.3
                for _ in range(20):  # then a probe on the loop, never a request, waits on it
                    started = time.monotonic()
                    await score.score(keys(3))
                    assert time.monotonic() - started < 0.1
                    await asyncio.sleep(0.1)
                return score.replica_health()
            finally:
                await score.close()

        health = asyncio.run(router())
        assert not health[silent]["up"] and health[silent]["failures"] >= 2  # probed again


def test_the_scaling_benchmark_drives_replicas_and_reports_each_setup() -> None:
    """benchmarks/directory_throughput.py --scaling at a tiny size (numbers not asserted)."""
    from kvpeer.bench.directory_scaling import format_scaling, measure

    with RedisServer() as redis:
        results = [
            measure(
                f"{n} on one Redis",
                redis.url,
                n,
                store_pids=[redis.pid],
                drivers=1,
                nodes_per_driver=2,
                seconds=1,
            )
            for n in (1, 2)
        ]
    for r in results:
        assert r.publish_keys_per_s > 0 and r.locate_p99_ms >= r.locate_p50_ms > 0
        assert r.directory_cpu_us_per_key > 0 and r.redis_cpu_us_per_key > 0
    table = format_scaling(results)
    assert "2 on one Redis" in table and "publish keys/s" in table


def test_a_replica_on_another_store_is_split_off_at_start(caplog) -> None:
    """One of three replicas points at another Redis: nodes never register or locate there."""
    with (
        RedisServer() as right,
        RedisServer() as wrong,
        holder_and_consumer([right.url, wrong.url, right.url], 30) as (started, holder, consumer),
    ):
        a, b, c = started
        with caplog.at_level("ERROR", logger="kvpeer.client.replicas"):
            holder.start()
            held = keys(20)
            holder.publish(held)
            assert holder.flush(20)
            wait_until(lambda: holder.replica_health()[b.endpoint]["split"], 10, "b split")
        assert [r.getMessage() for r in caplog.records if b.endpoint in r.getMessage()]
        assert "must use the same --store" in caplog.text
        health = holder.replica_health()
        assert not health[a.endpoint]["split"] and not health[c.endpoint]["split"]
        # The node registered in the directory's store only, never in the other one.
        assert not stub(b).ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
        assert [n.node_id for n in stub(c).ListNodes(pb.ListNodesRequest()).nodes] == ["holder"]
        # Locates rotate over the replicas; none is answered from the other store.
        for _ in range(12):
            location = consumer.locate(held)
            assert location.ok and all(location.holders)
        assert consumer.replica_health()[b.endpoint]["split"]


def test_replicas_agree_on_the_store_again_after_redis_comes_back_empty() -> None:
    """Redis restarts without persistence: running replicas write their marker back, a
    replica started since follows the same id, and nodes go on using all of them."""
    with RedisServer() as redis:
        args = ["--store", redis.url, "--lease-ttl", "30"]
        started = [DirectoryProcess(args, metrics=False) for _ in range(2)]
        try:

            def ids() -> set[str]:
                return {stub(p).Stats(pb.StatsRequest(), timeout=5).store_id for p in started}

            (before,) = ids()
            redis.stop()
            redis.start()  # empty: the layout marker is gone
            started.append(DirectoryProcess(args, metrics=False))
            wait_until(lambda: len(ids()) == 1, 10, "one store id on every replica")
            assert redis.client().get("kvpeer:layout").endswith(next(iter(ids())).encode())
            assert before
        finally:
            for process in started:
                process.close()


def test_nodes_follow_a_store_re_created_under_every_replica() -> None:
    """An operator resets the directory's Redis (a new layout marker, so a new store id)
    under running replicas: the replicas follow it, the holder re-registers and
    re-publishes, and a node that knew the old id locates through the replicas again
    instead of splitting every one of them off."""
    with (
        RedisServer() as redis,
        holder_and_consumer([redis.url, redis.url], 3) as (started, holder, consumer),
    ):
        holder.start()
        held = keys(20)
        holder.publish(held)
        assert holder.flush(20)
        for _ in range(4):  # both replicas answer, with the first store's id
            assert all(consumer.locate(held).holders)
        redis.client().flushall()
        redis.client().set("kvpeer:layout", "kvpeer-directory/1 shards=1 id=reset")

        def ids() -> set[str]:
            return {stub(p).Stats(pb.StatsRequest(), timeout=5).store_id for p in started}

        wait_until(lambda: ids() == {"reset"}, 10, "the replicas to follow the reset")
        wait_until(lambda: all(consumer.locate(held).holders), 15, "locates through the new store")
        health = consumer.replica_health()
        assert not any(h["split"] for h in health.values()), health


def test_a_misconfigured_replica_listed_first_is_outvoted() -> None:
    """The first answer, even the join, comes from the replica on the wrong Redis: the two
    that agree win, the node moves its registration there and locates find it."""
    with (
        RedisServer() as right,
        RedisServer() as wrong,
        holder_and_consumer([wrong.url, right.url, right.url], 3) as (started, holder, consumer),
    ):
        b, a, c = started
        holder.start()
        held = keys(20)
        holder.publish(held)
        wait_until(lambda: holder.replica_health()[b.endpoint]["split"], 10, "b split")
        wait_until(
            lambda: (
                [n.node_id for n in stub(c).ListNodes(pb.ListNodesRequest()).nodes] == ["holder"]
            ),
            15,
            "the holder registered in the store most replicas serve",
        )
        wait_until(lambda: all(consumer.locate(held).holders), 15, "the holder found")
        for _ in range(6):
            assert all(consumer.locate(held).holders)
        health = consumer.replica_health()
        assert health[b.endpoint]["split"] and not health[a.endpoint]["split"], health


def test_a_router_stops_scoring_from_a_replica_on_another_store() -> None:
    """The proxy's ScoreClient lists the replica on the wrong Redis first: once the two
    that agree have answered, it is split off and every score shows the holder."""
    with (
        RedisServer() as right,
        RedisServer() as wrong,
        holder_and_consumer([wrong.url, right.url, right.url], 30) as (started, holder, _),
    ):
        b = started[0]
        holder.start()
        held = keys(20)
        holder.publish(held)
        assert holder.flush(20)

        async def scores() -> tuple[list[list[str]], dict[str, dict[str, object]]]:
            client = ScoreClient([p.endpoint for p in started], timeout_s=2.0)
            try:
                answers = [[s.node_id for s in await client.score(held)] for _ in range(9)]
                return answers, client.replica_health()
            finally:
                await client.close()

        answers, health = asyncio.run(scores())
        # The very first answer may come from the wrong store: nothing to compare yet.
        assert answers[1:] == [["holder"]] * 8, answers
        assert health[b.endpoint]["split"], health
