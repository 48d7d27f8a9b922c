"""Directory.Score: each live node's longest held prefix and its load, on both stores.

Every test talks gRPC to a real DirectoryServer (tests/support/directory.py) over
the memory store and over a real redis-server; the same assertions hold for both.
"""

from __future__ import annotations

import time

import grpc
import pytest

from kvpeer.api.keys import KeySpec
from kvpeer.api.limits import MAX_KEYS_PER_CALL
from kvpeer.v1 import directory_pb2 as pb
from tests.support.directory import (
    FP_A,
    FP_B,
    RPC_TIMEOUT_S,
    DirectoryHarness,
    directory,
    join,
    keys,
    make_directory,
    publish,
    rpc_error,
)

__all__ = ["directory", "make_directory"]


def score(stub, ks: list[bytes], fingerprint: str = FP_A.digest) -> dict[str, int]:
    response = stub.Score(pb.ScoreRequest(fingerprint=fingerprint, keys=ks), timeout=RPC_TIMEOUT_S)
    return {n.node_id: n.prefix_keys for n in response.nodes}


def test_score_counts_only_the_consecutive_prefix(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ks = keys(20)
    ea, eb, ec = join(stub, "a"), join(stub, "b"), join(stub, "c")
    publish(stub, "a", ea, ks[:12])
    publish(stub, "b", eb, ks[:5] + ks[6:20])  # a gap at 5: the rest does not count
    publish(stub, "c", ec, ks[1:20])  # lacks the first key: nothing counts
    response = stub.Score(pb.ScoreRequest(fingerprint=FP_A.digest, keys=ks), timeout=RPC_TIMEOUT_S)
    # Longest first, then by node id; nodes holding nothing are listed too.
    assert [(n.node_id, n.prefix_keys) for n in response.nodes] == [("a", 12), ("b", 5), ("c", 0)]
    first = response.nodes[0]
    assert (first.endpoint, first.epoch, first.fingerprint) == ("a.test:7601", ea, FP_A.digest)
    assert not first.HasField("load") and first.load_age_ms == 0
    # Duplicates are just keys: the same key twice counts twice when held.
    assert score(stub, [ks[0], ks[0], ks[1], ks[5]]) == {"a": 4, "b": 3, "c": 0}
    # Keys nobody holds, and an empty namespace.
    assert score(stub, keys(3, tag="other")) == {"a": 0, "b": 0, "c": 0}
    assert score(stub, ks, fingerprint=FP_B.digest) == {}


def test_score_of_4096_keys_and_every_namespace(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ks = keys(MAX_KEYS_PER_CALL)
    ea, eb = join(stub, "a"), join(stub, "b", FP_B)
    for start in range(0, len(ks), 1024):
        publish(stub, "a", ea, ks[start : start + 1024])
    publish(stub, "b", eb, ks[:100])  # another namespace: scored against its own keys
    assert score(stub, ks) == {"a": MAX_KEYS_PER_CALL}
    assert score(stub, ks, fingerprint="") == {"a": MAX_KEYS_PER_CALL, "b": 100}
    started = time.perf_counter()
    for _ in range(20):
        score(stub, ks)
    per_call = (time.perf_counter() - started) / 20
    assert per_call < 0.05, f"a 4,096-key Score took {per_call * 1000:.1f} ms"


def test_heartbeat_load_is_reported_and_kept(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    ea = join(stub, "a")
    stub.Heartbeat(
        pb.HeartbeatRequest(
            node_id="a",
            epoch=ea,
            load=pb.NodeLoad(pinned_rows=7, running_requests=3, peer_leases=2),
        ),
        timeout=RPC_TIMEOUT_S,
    )
    stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=ea), timeout=RPC_TIMEOUT_S)  # no load
    time.sleep(0.05)
    (node,) = stub.Score(
        pb.ScoreRequest(fingerprint=FP_A.digest, keys=keys(1)), timeout=RPC_TIMEOUT_S
    ).nodes
    assert node.HasField("load")
    assert (node.load.pinned_rows, node.load.running_requests, node.load.peer_leases) == (7, 3, 2)
    assert 40 <= node.load_age_ms < 5000


def test_nodes_that_left_or_expired_are_not_scored(make_directory) -> None:
    for kind in ("memory", "redis"):
        directory = make_directory(kind, lease_ttl_s=0.5)
        stub = directory.stub()
        ks = keys(4)
        ea, eb = join(stub, "a"), join(stub, "b")
        publish(stub, "a", ea, ks)
        publish(stub, "b", eb, ks)
        stub.Leave(pb.LeaveRequest(node_id="a", epoch=ea), timeout=RPC_TIMEOUT_S)
        assert score(stub, ks) == {"b": 4}, kind
        time.sleep(0.7)  # b's lease runs out
        assert score(stub, ks) == {}, kind
        # A re-join is a new registration holding nothing yet.
        join(stub, "b")
        assert score(stub, ks) == {"b": 0}, kind


@pytest.mark.parametrize(
    ("ks", "code", "says"),
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "no keys"),
        (keys(MAX_KEYS_PER_CALL + 1, size=8), grpc.StatusCode.RESOURCE_EXHAUSTED, "max 4096"),
        ([b"a" * 36, b"b" * 20], grpc.StatusCode.INVALID_ARGUMENT, "key 1 has 20 bytes"),
        ([b"a" * 65], grpc.StatusCode.INVALID_ARGUMENT, "1 to 64 bytes"),
        ([b""], grpc.StatusCode.INVALID_ARGUMENT, "1 to 64 bytes"),
    ],
    ids=["empty", "4097-keys", "mixed-lengths", "too-long", "empty-key"],
)
def test_score_refuses_bad_batches(directory: DirectoryHarness, ks, code, says) -> None:
    stub = directory.stub()
    error = rpc_error(lambda: stub.Score(pb.ScoreRequest(fingerprint=FP_A.digest, keys=ks)))
    assert error.code() == code
    assert says in error.details()


def test_score_refuses_100k_keys_without_hanging(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    started = time.monotonic()
    error = rpc_error(
        lambda: stub.Score(
            pb.ScoreRequest(fingerprint=FP_A.digest, keys=keys(100_000)), timeout=RPC_TIMEOUT_S
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the 1 MiB message limit
    assert time.monotonic() - started < 5
    # Still serving.
    assert score(stub, keys(2)) == {}


def test_score_refuses_a_bad_fingerprint(directory: DirectoryHarness) -> None:
    stub = directory.stub()
    error = rpc_error(lambda: stub.Score(pb.ScoreRequest(fingerprint="nope", keys=keys(1))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fingerprint" in error.details()


def test_memory_and_redis_score_the_same_state_alike(make_directory) -> None:
    """The same calls on both stores give equal answers, so a router decides alike."""
    answers = []
    ks = keys(300)
    for kind in ("memory", "redis"):
        stub = make_directory(kind).stub()
        epochs = {n: join(stub, n) for n in ("n0", "n1", "n2", "n3")}
        publish(stub, "n0", epochs["n0"], ks[:40])
        publish(stub, "n1", epochs["n1"], ks[:200])
        publish(stub, "n2", epochs["n2"], ks[:199] + ks[250:])
        publish(stub, "n3", epochs["n3"], ks[100:])
        stub.Withdraw(pb.WithdrawRequest(node_id="n1", epoch=epochs["n1"], keys=ks[150:151]))
        answers.append(
            [score(stub, ks), score(stub, ks[:199]), score(stub, ks[100:]), score(stub, ks[:1])]
        )
    assert answers[0] == answers[1]
    assert answers[0][0] == {"n0": 40, "n1": 150, "n2": 199, "n3": 0}


def test_score_through_grpcurl_and_reflection() -> None:
    """An operator sees Score through reflection and calls it with grpcurl (JSON)."""
    import base64
    import json
    import subprocess
    import sys
    from pathlib import Path

    from kvpeer.sim.directory import DirectoryProcess
    from kvpeer.v1 import directory_pb2_grpc

    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    with DirectoryProcess(["--lease-ttl", "30"]) as process:
        with grpc.insecure_channel(process.endpoint) as channel:
            stub = directory_pb2_grpc.DirectoryStub(channel)
            epoch = join(stub, "a")
            publish(stub, "a", epoch, keys(3))
        described = subprocess.run(
            [grpcurl, "-plaintext", process.endpoint, "describe", "kvpeer.v1.Directory"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "rpc Score ( .kvpeer.v1.ScoreRequest )" in described.stdout, described.stderr
        request = {"keys": [base64.b64encode(k).decode() for k in [*keys(2), b"x" * 36]]}

        def score(body: str) -> dict:
            result = subprocess.run(
                [grpcurl, "-plaintext", "-d", body, process.endpoint, "kvpeer.v1.Directory/Score"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            return {
                n["node_id"]: n.get("prefix_keys", 0) for n in json.loads(result.stdout)["nodes"]
            }

        assert score(json.dumps(request)) == {"a": 2}
        # The README's command: kvpeer keys writes the request for a prompt's keys.
        tokens = list(range(100, 100 + 16 * 5))
        with grpc.insecure_channel(process.endpoint) as channel:
            stub = directory_pb2_grpc.DirectoryStub(channel)
            epoch = join(stub, "b")
            publish(stub, "b", epoch, KeySpec(16, seed="t").chunk_keys(tokens)[:4])
        kvpeer = str(Path(sys.executable).parent / "kvpeer")
        ids = ",".join(map(str, tokens))
        printed = subprocess.run(
            [
                kvpeer,
                "keys",
                "--block-size",
                "16",
                "--tokens",
                ids,
                "--hash-seed",
                "t",
                "--score-request",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert score(printed) == {"b": 4, "a": 0}
