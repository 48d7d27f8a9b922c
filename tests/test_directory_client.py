"""DirectoryClient against a real directory: publishing, locating, outages, re-joins."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from kvpeer.api.errors import ConfigError
from kvpeer.api.security import Security
from kvpeer.client.directory import DirectoryClient
from kvpeer.client.location import Holder, Location, longest_run
from kvpeer.v1 import directory_pb2 as pb
from tests.support.directory import (
    FP_A,
    FP_B,
    RPC_TIMEOUT_S,
    keys,
    make_directory,
    wait_until,
)
from tests.support.redis_server import free_port

__all__ = ["make_directory"]  # fixture used by the tests below


@pytest.fixture
def clients() -> Iterator[list[DirectoryClient]]:
    """Collects clients made by a test and closes them all afterwards."""
    made: list[DirectoryClient] = []
    try:
        yield made
    finally:
        for client in made:
            client.close()


def client_for(
    clients: list[DirectoryClient], endpoint: str, node_id: str, *, start: bool = True, **options
) -> DirectoryClient:
    options.setdefault("fingerprint", FP_A)
    options.setdefault("rpc_timeout_s", RPC_TIMEOUT_S)
    client = DirectoryClient(endpoint, node_id=node_id, advertise=f"{node_id}.test:7601", **options)
    clients.append(client)
    if start:
        client.start()
    return client


def found(location: Location) -> int:
    return sum(1 for row in location.holders if row)


def test_publish_then_another_node_locates(make_directory, clients) -> None:
    directory = make_directory("memory")
    a = client_for(clients, directory.endpoint, "a")
    b = client_for(clients, directory.endpoint, "b")
    c = client_for(clients, directory.endpoint, "c")
    ks = keys(3000)
    a.publish(ks)
    b.publish(ks[:100])
    assert a.flush(30) and b.flush(30)

    location = c.locate(ks)
    assert location.ok and location.error is None
    assert len(location.holders) == 3000
    assert {h.node_id for h in location.holders[0]} == {"a", "b"}
    assert location.holders[2999] == [Holder("a", "a.test:7601", a.epoch)]
    holder, run = longest_run(location)
    assert (holder.node_id, run) == ("a", 3000)
    # A node never finds itself.
    assert {h.node_id for h in b.locate(ks[:1]).holders[0]} == {"a"}
    assert a.stats()["published"] == 3000
    assert a.stats()["publish_calls"] >= 3  # batches of at most 1,024 keys


def test_withdraw(make_directory, clients) -> None:
    directory = make_directory("memory")
    a = client_for(clients, directory.endpoint, "a")
    b = client_for(clients, directory.endpoint, "b", publish=False)
    ks = keys(10)
    a.publish(ks)
    a.withdraw(ks[:4])
    a.withdraw(keys(2, tag="never"))  # ignored: never published
    assert a.flush(30)
    assert [bool(row) for row in b.locate(ks).holders] == [False] * 4 + [True] * 6
    a.withdraw(ks[4:6])
    assert a.flush(30)
    assert found(b.locate(ks)) == 4
    assert a.stats()["held"] == 4


def test_locate_splits_large_requests(make_directory, clients) -> None:
    directory = make_directory("memory")
    a = client_for(clients, directory.endpoint, "a")
    b = client_for(clients, directory.endpoint, "b", publish=False)
    ks = keys(10_000)
    a.publish(ks[::2])
    assert a.flush(60)
    location = b.locate(ks)  # more than one Locate call holds
    assert location.ok
    assert [bool(row) for row in location.holders] == [i % 2 == 0 for i in range(10_000)]


def test_publish_never_blocks_while_directory_is_down(make_directory, clients) -> None:
    directory = make_directory("memory", start=False)
    directory.port = free_port()  # nothing listens there yet
    a = client_for(clients, directory.endpoint, "a", rpc_timeout_s=2.0)
    ks = keys(20_000)
    slowest = 0.0
    for i in range(0, len(ks), 500):
        started = time.monotonic()
        a.publish(ks[i : i + 500])
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5, f"publish() took {slowest:.3f} s while the directory was down"
    assert not a.connected
    assert a.flush(0.3) is False

    directory.start()
    assert a.flush(60), a.stats()
    assert a.connected
    b = client_for(clients, directory.endpoint, "b", publish=False)
    assert found(b.locate(ks)) == 20_000


def test_client_rejoins_and_republishes_after_memory_directory_restart(
    make_directory, clients
) -> None:
    directory = make_directory("memory", lease_ttl_s=1.0)
    a = client_for(clients, directory.endpoint, "a")
    ks = keys(2500)
    a.publish(ks)
    assert a.flush(30)
    first_epoch = a.epoch

    directory.restart()  # a new, empty memory store on the same port
    b = client_for(clients, directory.endpoint, "b", publish=False)
    wait_until(lambda: found(b.locate(ks)) == 2500, what="a to re-join and re-publish")
    assert a.epoch > first_epoch
    assert a.stats()["rejoins"] >= 1
    assert all(row == [Holder("a", "a.test:7601", a.epoch)] for row in b.locate(ks).holders)


def test_heartbeats_keep_the_lease_and_close_leaves(make_directory, clients) -> None:
    directory = make_directory("memory", lease_ttl_s=1.0)
    a = client_for(clients, directory.endpoint, "a")
    b = client_for(clients, directory.endpoint, "b", publish=False)
    ks = keys(5)
    a.publish(ks)
    assert a.flush(30)
    epoch = a.epoch
    time.sleep(3.0)  # three lease lengths: only heartbeats keep "a" listed
    assert found(b.locate(ks)) == 5
    assert a.epoch == epoch and a.stats()["heartbeats"] >= 4

    a.close()
    stub = directory.stub()
    assert stub.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes == []
    assert found(b.locate(ks)) == 0


def test_stale_epoch_makes_the_client_rejoin(make_directory, clients) -> None:
    directory = make_directory("memory", lease_ttl_s=1.0)
    a = client_for(clients, directory.endpoint, "a")
    a.publish(keys(50))
    assert a.flush(30)
    first = a.epoch
    # Someone else joins as "a": the client's epoch is now stale.
    stub = directory.stub()
    stolen = stub.Join(
        pb.JoinRequest(node_id="a", endpoint="impostor:1", fingerprint=FP_A.to_proto()),
        timeout=RPC_TIMEOUT_S,
    ).epoch
    wait_until(lambda: (a.epoch or 0) > stolen, what="the client to re-join")
    assert a.epoch > first
    assert a.flush(30)
    b = client_for(clients, directory.endpoint, "b", publish=False)
    rows = b.locate(keys(50)).holders
    assert all(row == [Holder("a", "a.test:7601", a.epoch)] for row in rows)


def test_locate_when_directory_is_unreachable(make_directory, clients) -> None:
    directory = make_directory("memory", start=False)
    directory.port = free_port()
    b = client_for(clients, directory.endpoint, "b", publish=False, locate_backoff_s=0.5)
    started = time.monotonic()
    location = b.locate(keys(3))
    assert time.monotonic() - started < RPC_TIMEOUT_S + 1
    assert location == Location([[], [], []], False, location.error)
    assert directory.endpoint in location.error and "UNAVAILABLE" in location.error
    # Within the back-off, further locates do not even try.
    started = time.monotonic()
    again = b.locate(keys(3))
    assert time.monotonic() - started < 0.1
    assert not again.ok and "not asking again" in again.error
    assert b.stats()["locate_skipped"] == 1

    directory.start()
    wait_until(lambda: b.locate(keys(1)).ok, what="locate to work again")


def test_every_call_has_a_deadline(clients) -> None:
    """A directory that accepts connections but never answers costs a bounded wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        a = client_for(clients, endpoint, "a", rpc_timeout_s=0.5)
        started = time.monotonic()
        location = a.locate(keys(2))
        assert not location.ok
        assert time.monotonic() - started < 3.0
        a.publish(keys(2))
        assert a.flush(0.5) is False
        started = time.monotonic()
        a.close()
        assert time.monotonic() - started < 5.0


def test_publish_false_locates_but_never_joins(make_directory, clients) -> None:
    directory = make_directory("memory")
    a = client_for(clients, directory.endpoint, "a")
    quiet = client_for(clients, directory.endpoint, "quiet", publish=False)
    quiet.publish(keys(3))  # a no-op
    a.publish(keys(3))
    assert a.flush(30) and quiet.flush(1)
    assert quiet.epoch is None
    assert found(quiet.locate(keys(3))) == 3
    names = [n.node_id for n in directory.stub().ListNodes(pb.ListNodesRequest()).nodes]
    assert names == ["a"]


def test_fingerprints_do_not_mix(make_directory, clients) -> None:
    directory = make_directory("memory")
    a = client_for(clients, directory.endpoint, "a", fingerprint=FP_A)
    other = client_for(clients, directory.endpoint, "other", fingerprint=FP_B)
    a.publish(keys(4))
    assert a.flush(30)
    assert found(other.locate(keys(4))) == 0


def test_token(make_directory, clients, tmp_path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right-token")
    bad.write_text("wrong-token")
    directory = make_directory("memory", security=Security.from_config(auth_token_file=str(good)))
    a = client_for(
        clients,
        directory.endpoint,
        "a",
        security=Security.from_config(auth_token_file=str(good)),
    )
    a.publish(keys(2))
    assert a.flush(30)
    intruder = client_for(
        clients,
        directory.endpoint,
        "intruder",
        publish=False,
        security=Security.from_config(auth_token_file=str(bad)),
    )
    location = intruder.locate(keys(2))
    assert not location.ok and "UNAUTHENTICATED" in location.error


def test_bad_arguments(make_directory) -> None:
    with pytest.raises(ConfigError, match="advertise"):
        DirectoryClient("dir:7600", node_id="a", advertise="0.0.0.0:7601", fingerprint=FP_A)
    with pytest.raises(ConfigError, match="directory"):
        DirectoryClient("dir", node_id="a", advertise="a:7601", fingerprint=FP_A)
    with pytest.raises(ConfigError, match="publish_batch_keys"):
        DirectoryClient(
            "dir:7600", node_id="a", advertise="a:7601", fingerprint=FP_A, publish_batch_keys=0
        )
    client = DirectoryClient("dir:7600", node_id="a", advertise="a:7601", fingerprint=FP_A)
    try:
        with pytest.raises(ValueError, match="1 to 64 bytes"):
            client.publish([b""])
        with pytest.raises(ValueError, match="1 to 64 bytes"):
            client.locate([b"x" * 65])
        assert client.locate([]) == Location([], True)
    finally:
        client.close()


# -- longest_run ---------------------------------------------------------------

A, B, C = (Holder(n, f"{n}:7601", 1) for n in "abc")


@pytest.mark.parametrize(
    ("rows", "exclude", "expected"),
    [
        ([[A], [A], [A, B], [B]], None, (A, 3)),
        ([[A, B], [B], [B], [A]], None, (B, 3)),
        ([[A, B], [A, B], [B], []], "b", (A, 2)),
        ([[], [A], [A]], None, (None, 0)),
        ([[A]], "a", (None, 0)),
        ([], None, (None, 0)),
        ([[C], [], [C]], None, (C, 1)),
    ],
)
def test_longest_run(rows, exclude, expected) -> None:
    assert longest_run(Location(rows, True), exclude=exclude) == expected


def test_longest_run_spreads_ties_over_replicas() -> None:
    location = Location([[A, B, C], [A, B], [A, B]], True)
    rng = random.Random(7)
    picks = {longest_run(location, rng=rng)[0].node_id for _ in range(100)}
    assert picks == {"a", "b"}
    assert longest_run(location, rng=random.Random(1)) == longest_run(
        location, rng=random.Random(1)
    )
