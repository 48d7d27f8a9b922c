"""The Directory service's behaviour, the same suite over the memory and the Redis store.

Every test talks gRPC to a real DirectoryServer on loopback; Redis tests use a
real redis-server (tests/support/redis_server.py).
"""

from __future__ import annotations

import time
import urllib.request
from contextlib import ExitStack

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpeer.api.errors import ConfigError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.security import Security
from kvpeer.server.directory.memory_store import MemoryStore
from kvpeer.server.directory.redis_store import RedisStore
from kvpeer.server.directory.service import DirectoryServer
from kvpeer.server.directory.store import (
    DirectoryStore,
    MisconfiguredStoreError,
    NamespaceStats,
    StoreUnavailableError,
)
from kvpeer.server.directory.stores import open_store
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.directory import (
    FP_A,
    FP_B,
    RPC_TIMEOUT_S,
    DirectoryHarness,
    directory,
    join,
    keys,
    locate,
    make_directory,
    publish,
    refused_at_start,
    rpc_error,
    wait_until,
)
from tests.support.redis_server import RedisServer

__all__ = ["directory", "make_directory"]  # fixtures used by the tests below


def test_join_publish_locate_withdraw_leave(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ea, eb = join(stub, "a"), join(stub, "b")
    assert eb > ea > 0
    ks = keys(15)
    assert publish(stub, "a", ea, ks[:10]).accepted == 10
    publish(stub, "b", eb, ks[5:])

    holders = locate(stub, ks, exclude="c")
    assert holders[:5] == [{("a", ea)}] * 5
    assert holders[5:10] == [{("a", ea), ("b", eb)}] * 5
    assert holders[10:] == [{("b", eb)}] * 5
    assert locate(stub, keys(3, tag="other")) == [set()] * 3

    # A node never sees itself.
    assert locate(stub, ks[5:10], exclude="a") == [{("b", eb)}] * 5

    response = stub.Locate(
        pb.LocateRequest(fingerprint=FP_A.digest, keys=ks[:1], exclude_node_id="c"),
        timeout=RPC_TIMEOUT_S,
    )
    assert [(n.node_id, n.endpoint) for n in response.nodes] == [("a", "a.test:7601")]

    removed = stub.Withdraw(
        pb.WithdrawRequest(node_id="a", epoch=ea, keys=[*ks[:3], b"never-published"]),
        timeout=RPC_TIMEOUT_S,
    ).removed
    assert removed == 3
    assert locate(stub, ks[:4]) == [set(), set(), set(), {("a", ea)}]

    stub.Leave(pb.LeaveRequest(node_id="a", epoch=ea), timeout=RPC_TIMEOUT_S)
    assert locate(stub, ks[5:10]) == [{("b", eb)}] * 5
    nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
    assert [(n.node_id, n.epoch, n.keys) for n in nodes] == [("b", eb, 10)]


def test_list_nodes_and_stats(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ea, eb, ec = join(stub, "a"), join(stub, "b"), join(stub, "c", FP_B)
    publish(stub, "a", ea, keys(7))
    publish(stub, "b", eb, keys(3))
    publish(stub, "c", ec, keys(2))

    nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
    assert [(n.node_id, n.endpoint, n.epoch, n.keys) for n in nodes] == [
        ("a", "a.test:7601", ea, 7),
        ("b", "b.test:7601", eb, 3),
        ("c", "c.test:7601", ec, 2),
    ]
    assert Fingerprint.from_proto(nodes[2].fingerprint) == FP_B
    assert all(0 < n.lease_remaining_ms <= directory.lease_ttl_s * 1000 for n in nodes)
    only_b = stub.ListNodes(pb.ListNodesRequest(fingerprint=FP_B.digest), timeout=RPC_TIMEOUT_S)
    assert [n.node_id for n in only_b.nodes] == ["c"]

    stats = stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
    assert (stats.nodes, stats.keys) == (3, 12)
    per_fp = {f.fingerprint: (f.nodes, f.keys) for f in stats.fingerprints}
    assert per_fp == {FP_A.digest: (2, 10), FP_B.digest: (1, 2)}
    assert stats.store == ("memory" if directory.kind == "memory" else directory.redis.url)


def test_fingerprints_are_separate_namespaces(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ea, eb = join(stub, "a", FP_A), join(stub, "b", FP_B)
    shared = keys(4)
    publish(stub, "a", ea, shared)
    publish(stub, "b", eb, shared)
    assert locate(stub, shared, FP_A) == [{("a", ea)}] * 4
    assert locate(stub, shared, FP_B) == [{("b", eb)}] * 4
    unknown = Fingerprint.of(model="nobody")
    assert locate(stub, shared, unknown) == [set()] * 4


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_lease_expiry_removes_silent_nodes(make_directory, kind: str) -> None:
    _check_lease_expiry(make_directory(kind, lease_ttl_s=1.0))


def _check_lease_expiry(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ea, eb = join(stub, "alive"), join(stub, "silent")
    ks = keys(5)
    publish(stub, "alive", ea, ks)
    publish(stub, "silent", eb, ks)
    started = time.monotonic()
    # "alive" heartbeats well within its lease; "silent" does not.
    while time.monotonic() - started < 2.5 * directory.lease_ttl_s:
        stub.Heartbeat(pb.HeartbeatRequest(node_id="alive", epoch=ea), timeout=RPC_TIMEOUT_S)
        time.sleep(0.1)
    assert locate(stub, ks) == [{("alive", ea)}] * 5
    nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
    assert [n.node_id for n in nodes] == ["alive"]
    error = rpc_error(
        lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="silent", epoch=eb), timeout=10)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown node silent" in error.details() and "re-join" in error.details()
    # Re-joining brings it back with a new epoch; nothing of the old lease remains.
    eb2 = join(stub, "silent")
    assert eb2 > eb
    assert locate(stub, ks) == [{("alive", ea)}] * 5


def test_rejoin_fences_old_entries_and_refuses_stale_epoch(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    e1 = join(stub, "a")
    ks = keys(6)
    publish(stub, "a", e1, ks)
    e2 = join(stub, "a")
    assert e2 > e1
    assert locate(stub, ks) == [set()] * 6  # old entries are fenced off at once

    for call in (
        lambda: publish(stub, "a", e1, ks[:1]),
        lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=e1), timeout=10),
        lambda: stub.Withdraw(pb.WithdrawRequest(node_id="a", epoch=e1, keys=ks), timeout=10),
        lambda: stub.Leave(pb.LeaveRequest(node_id="a", epoch=e1), timeout=10),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == f"stale epoch {e1} for node a (current {e2}): re-join"

    publish(stub, "a", e2, ks[:2])
    assert locate(stub, ks[:3]) == [{("a", e2)}, {("a", e2)}, set()]


def test_unknown_node_is_not_found(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    for call in (
        lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="ghost", epoch=5), timeout=10),
        lambda: publish(stub, "ghost", 5, keys(1)),
        lambda: stub.Withdraw(
            pb.WithdrawRequest(node_id="ghost", epoch=5, keys=keys(1)), timeout=10
        ),
        lambda: stub.Leave(pb.LeaveRequest(node_id="ghost", epoch=5), timeout=10),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().startswith("unknown node ghost:")
    epoch = join(stub, "left")
    stub.Leave(pb.LeaveRequest(node_id="left", epoch=epoch), timeout=RPC_TIMEOUT_S)
    error = rpc_error(lambda: publish(stub, "left", epoch, keys(1)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def _join(node_id: str = "n", endpoint: str = "n.test:7601", fingerprint=None):
    fp = FP_A.to_proto() if fingerprint is None else fingerprint
    return lambda stub: stub.Join(
        pb.JoinRequest(node_id=node_id, endpoint=endpoint, fingerprint=fp), timeout=10
    )


def _publish(ks: list[bytes], epoch: int = 1, node_id: str = "n"):
    return lambda stub: stub.Publish(
        pb.PublishRequest(node_id=node_id, epoch=epoch, keys=ks), timeout=10
    )


def _locate(ks: list[bytes], fingerprint: str = FP_A.digest):
    return lambda stub: stub.Locate(pb.LocateRequest(fingerprint=fingerprint, keys=ks), timeout=10)


_FORGED = FP_A.to_proto()
_FORGED.ingredients["model"] = "something-else"

BAD_REQUESTS = {
    "empty node id": (_join(node_id=""), "INVALID_ARGUMENT", "node_id is empty"),
    "node id with space": (_join(node_id="a b"), "INVALID_ARGUMENT", "without spaces"),
    "empty endpoint": (_join(endpoint=""), "INVALID_ARGUMENT", "endpoint is empty"),
    "endpoint without port": (_join(endpoint="host"), "INVALID_ARGUMENT", "missing ':port'"),
    "wildcard endpoint": (_join(endpoint="0.0.0.0:7601"), "INVALID_ARGUMENT", "advertise"),
    "missing fingerprint": (
        lambda stub: stub.Join(pb.JoinRequest(node_id="n", endpoint="n:1"), timeout=10),
        "INVALID_ARGUMENT",
        "fingerprint is missing",
    ),
    "forged fingerprint": (
        _join(fingerprint=_FORGED),
        "INVALID_ARGUMENT",
        "does not match its ingredients",
    ),
    "epoch 0": (_publish(keys(1), epoch=0), "INVALID_ARGUMENT", "epoch is 0 for node n"),
    "empty publish": (_publish([]), "INVALID_ARGUMENT", "no keys"),
    "oversized publish": (_publish(keys(4097)), "RESOURCE_EXHAUSTED", "4097 keys in one call"),
    "empty key": (_publish([b"ok", b""]), "INVALID_ARGUMENT", "key 1 has 0 bytes"),
    "long key": (_publish([b"x" * 65]), "INVALID_ARGUMENT", "key 0 has 65 bytes"),
    "empty locate": (_locate([]), "INVALID_ARGUMENT", "no keys"),
    "oversized locate": (_locate(keys(5000)), "RESOURCE_EXHAUSTED", "5000 keys in one call"),
    "locate bad fingerprint": (
        _locate(keys(1), fingerprint="model=llama"),
        "INVALID_ARGUMENT",
        "not a fingerprint digest",
    ),
    "locate no fingerprint": (_locate(keys(1), fingerprint=""), "INVALID_ARGUMENT", "digest"),
    "list bad fingerprint": (
        lambda stub: stub.ListNodes(pb.ListNodesRequest(fingerprint="XYZ"), timeout=10),
        "INVALID_ARGUMENT",
        "not a fingerprint digest",
    ),
}


def test_bad_requests_get_clear_statuses(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    failures = []
    for name, (call, code, fragment) in BAD_REQUESTS.items():
        error = rpc_error(lambda call=call: call(stub))
        if error.code().name != code or fragment not in error.details():
            failures.append(f"{name}: got {error.code().name} {error.details()!r}")
    assert not failures, failures
    # Nothing broke: the directory still works.
    epoch = join(stub, "after")
    publish(stub, "after", epoch, keys(1))
    assert locate(stub, keys(1)) == [{("after", epoch)}]


def test_keys_of_any_valid_size_round_trip(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    epoch = join(stub, "a")
    odd = [b"\x00", b"\xff" * 64, bytes(range(20)), b"a;b,c d\n", b"\x00" * 36]
    publish(stub, "a", epoch, odd)
    assert locate(stub, odd) == [{("a", epoch)}] * len(odd)
    assert locate(stub, [b"\x00\x00"]) == [set()]


def test_batches_at_the_limit(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    epoch = join(stub, "a")
    ks = keys(4096, size=64)
    assert publish(stub, "a", epoch, ks).accepted == 4096
    holders = locate(stub, ks)
    assert holders == [{("a", epoch)}] * 4096


def test_restart_memory_forgets_redis_remembers(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    epoch = join(stub, "a")
    ks = keys(20)
    publish(stub, "a", epoch, ks)

    directory.restart()
    stub = directory.stub()
    if directory.kind == "memory":
        assert locate(stub, ks) == [set()] * 20
        error = rpc_error(lambda: publish(stub, "a", epoch, ks))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    else:
        assert locate(stub, ks) == [{("a", epoch)}] * 20
        stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=epoch), timeout=RPC_TIMEOUT_S)
    # Either way a re-join gets a higher epoch than before the restart.
    assert join(stub, "a") > epoch


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_sweep_frees_entries_of_ended_registrations(kind: str) -> None:
    """Fenced and expired entries are invisible at once; sweep() frees them in bounded slices."""
    with ExitStack() as stack:
        if kind == "memory":
            store: DirectoryStore = MemoryStore(sweep_batch=1000)
        else:
            redis = stack.enter_context(RedisServer())
            store = RedisStore(redis.url, sweep_batch=1000)
        stack.callback(store.close)
        e1 = store.join("a", "a:1", FP_A, 30.0)
        store.publish("a", e1, keys(3000))
        e2 = store.join("a", "a:1", FP_A, 30.0)  # fences e1's 3,000 entries
        store.publish("a", e2, keys(100))
        eb = store.join("b", "b:1", FP_A, 0.3)
        store.publish("b", eb, keys(50, tag="b"))
        wait_until(lambda: [r.node_id for r in store.list_nodes()] == ["a"], what="b's expiry")

        freed = []
        while slice_freed := store.sweep():
            freed.append(slice_freed)
        assert sum(freed) == 3050
        assert max(freed) <= 1000
        assert store.stats() == [NamespaceStats(FP_A.digest, 1, 100)]
        located = store.locate(FP_A.digest, [*keys(101), *keys(1, tag="b")], "")
        assert [located.nodes[i].epoch for row in located.holders for i in row] == [e2] * 100
        if kind == "redis":
            client = stack.enter_context(redis.client())
            # Only e2's 100 entries are left in the namespace's hash.
            assert client.hlen(f"kvpeer:k:{FP_A.digest}") == 100
            # That hash, e2's key set, registration, node, lease, epoch and layout keys.
            assert client.dbsize() == 7


def test_server_sweeps_redis_automatically(make_directory) -> None:
    directory = make_directory("redis")
    stub = directory.stub()
    e1 = join(stub, "a")
    publish(stub, "a", e1, keys(3000))
    join(stub, "a")
    client = directory.redis.client()
    try:
        wait_until(lambda: client.dbsize() < 10, what="the server's sweeper to free Redis")
    finally:
        client.close()


def test_metrics_endpoint(make_directory) -> None:
    first = make_directory("memory", metrics_listen="127.0.0.1:0")
    second = make_directory("memory", metrics_listen="127.0.0.1:0")
    stub = first.stub()
    epoch = join(stub, "a")
    publish(stub, "a", epoch, keys(10))
    locate(stub, keys(4))
    rpc_error(lambda: publish(stub, "ghost", 1, keys(1)))

    def scrape(harness: DirectoryHarness) -> str:
        url = f"http://127.0.0.1:{harness.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    text = scrape(first)
    for line in (
        'kvpeer_directory_requests_total{code="OK",method="Locate"} 1.0',
        'kvpeer_directory_requests_total{code="OK",method="Publish"} 1.0',
        'kvpeer_directory_requests_total{code="NOT_FOUND",method="Publish"} 1.0',
        'kvpeer_directory_request_keys_total{method="Locate"} 4.0',
        "kvpeer_directory_located_keys_total 4.0",
        f'kvpeer_directory_nodes{{fingerprint="{FP_A.digest}"}} 1.0',
        f'kvpeer_directory_keys{{fingerprint="{FP_A.digest}"}} 10.0',
        "kvpeer_directory_store_up 1.0",
        'kvpeer_directory_request_seconds_count{method="Locate"} 1.0',
    ):
        assert line in text, line
    # Each server has its own registry.
    assert 'method="Locate"} 1.0' not in scrape(second)


def test_redis_down_mid_run_then_back(make_directory) -> None:
    directory = make_directory("redis")
    stub = directory.stub()
    epoch = join(stub, "a")
    ks = keys(10)
    publish(stub, "a", epoch, ks)

    directory.redis.stop()
    for call in (
        lambda: locate(stub, ks),
        lambda: join(stub, "b"),
        lambda: publish(stub, "a", epoch, ks),
        lambda: stub.Stats(pb.StatsRequest(), timeout=10),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert f"redis at 127.0.0.1:{directory.redis.port} unreachable" in error.details()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(directory.endpoint))
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).status
    assert status == health_pb2.HealthCheckResponse.SERVING  # the server itself keeps running

    directory.redis.start()  # append-only file: the data comes back
    wait_until(lambda: _answers(stub), what="the directory to reach Redis again")
    stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=epoch), timeout=RPC_TIMEOUT_S)
    assert locate(stub, ks) == [{("a", epoch)}] * 10


def _answers(stub: directory_pb2_grpc.DirectoryStub) -> bool:
    try:
        stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
    except grpc.RpcError:
        return False
    return True


def test_replicas_share_one_redis(make_directory) -> None:
    first = make_directory("redis")
    second = DirectoryHarness("redis", first.redis).start()
    try:
        s1, s2 = first.stub(), second.stub()
        e1 = join(s1, "a")
        publish(s2, "a", e1, keys(5))  # joined at one replica, publishing at the other
        assert locate(s1, keys(5)) == [{("a", e1)}] * 5
        e2 = join(s2, "a")
        assert e2 > e1
        error = rpc_error(lambda: publish(s1, "a", e1, keys(1)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == f"stale epoch {e1} for node a (current {e2}): re-join"
        eb = join(s1, "b")
        assert eb > e2  # one epoch sequence across replicas
    finally:
        second.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_epochs_grow_across_fresh_stores(kind: str) -> None:
    """A store created after another (a restarted directory) still hands out higher epochs."""
    if kind == "memory":
        first = MemoryStore().join("a", "a:1", FP_A, 5.0)
        assert MemoryStore().join("a", "a:1", FP_A, 5.0) > first
        return
    with RedisServer() as redis:  # no persistence: the restarted Redis starts empty
        first = RedisStore(redis.url).join("a", "a:1", FP_A, 5.0)
        redis.stop()
        redis.start()
        assert RedisStore(redis.url).join("a", "a:1", FP_A, 5.0) > first


def test_a_replica_on_another_database_is_refused_at_start() -> None:
    """db 0 holds the directory; a replica pointed at db 1 would be a silent split brain."""
    with RedisServer() as redis:
        RedisStore(redis.url).close()  # the directory, in db 0
        wrong = redis.url.replace("/0", "/1")
        with pytest.raises(ConfigError, match="but database 0 of the same server holds one"):
            RedisStore(wrong)
        stderr = refused_at_start("--store", wrong)
        assert "--store: redis://127.0.0.1" in stderr
        assert "point every replica at the same database" in stderr
        RedisStore(wrong, prefix="other:").close()  # another prefix: another directory
        # The escape hatch the message names: a separate directory in db 1 on purpose.
        one = redis.client()
        one.select(1)
        one.set("kvpeer:layout", "kvpeer-directory/1 shards=1 id=separate")
        RedisStore(wrong).join("a", "a:1", FP_A, 5.0)
        one.set("kvpeer:layout", "something else")
        with pytest.raises(ConfigError, match="not a kvpeer-directory/1 layout"):
            RedisStore(wrong)


def test_a_check_a_down_redis_postponed_refuses_calls_once_it_is_up() -> None:
    with RedisServer(appendonly=True) as redis:
        RedisStore(redis.url).close()  # the directory, in db 0
        redis.stop()
        store = RedisStore(redis.url.replace("/0", "/1"))  # Redis down: checked later
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            store.join("a", "a:1", FP_A, 5.0)
        redis.start()
        with pytest.raises(MisconfiguredStoreError, match="database 0 of the same server"):
            store.join("a", "a:1", FP_A, 5.0)
        assert redis.client().exists("kvpeer:layout")  # db 0's marker; db 1 stays empty
        one = redis.client()
        one.select(1)
        assert one.dbsize() == 0


def test_server_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="lease_ttl"):
        DirectoryServer("127.0.0.1:0", lease_ttl_s=0)
    with pytest.raises(ConfigError, match="redis://host:port/db"):
        open_store("postgres://x")
    with pytest.raises(ConfigError, match="invalid Redis URL"):
        RedisStore("redis://:notaport/0")


def test_token_protects_the_directory(make_directory, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    directory = make_directory(
        "memory", security=Security.from_config(auth_token_file=str(token_file))
    )
    error = rpc_error(lambda: join(directory.stub(), "a"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    channel = Security.from_config(auth_token_file=str(token_file)).open_channel(directory.endpoint)
    try:
        assert join(directory_pb2_grpc.DirectoryStub(channel), "a") > 0
    finally:
        channel.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_node_cannot_grow_the_directory_past_its_key_cap(make_directory, kind) -> None:
    harness = make_directory(kind, max_keys_per_node=100)
    stub = harness.stub()
    epoch = join(stub, "greedy")
    publish(stub, "greedy", epoch, keys(90))
    publish(stub, "greedy", epoch, keys(90))  # already held: republishing is fine

    error = rpc_error(lambda: publish(stub, "greedy", epoch, keys(20, tag="more")))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 100 per node" in error.details()
    assert locate(stub, keys(1, tag="more")) == [set()], "the refused batch recorded nothing"
    stub.Withdraw(pb.WithdrawRequest(node_id="greedy", epoch=epoch, keys=keys(50)), timeout=10)
    publish(stub, "greedy", epoch, keys(20, tag="more"))  # room again
    assert locate(stub, keys(1, tag="more")) == [{("greedy", epoch)}]
