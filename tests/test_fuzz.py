"""Hostile input: every method of both gRPC services, the wire decoders and the pull client.

Each server test sends structured-but-adversarial, mutated and random request
bodies (:mod:`tests.support.fuzz`) as raw bytes on one method of a real server
on loopback, and checks every answer against a model of what the server must
say: RESOURCE_EXHAUSTED above the request limit, INVALID_ARGUMENT for bytes that
do not parse, then the method's own rules (node ids, epochs, leases, keys), and
for OK answers the content (hits, rows byte for byte, holders, listings). Never
UNKNOWN or INTERNAL, never a refusal without a message, never a hang (every call
has a deadline). Afterwards the server still serves correctly and holds no pins.

Client side: :func:`kvpeer.api.wire.decode_chunk`, :func:`kvpeer.api.wire.decode_chunk_header`
and :meth:`Fingerprint.from_proto` get random and mutated bytes, and
:meth:`PeerClient.pull` streams from a hostile server that sends garbage,
mutated, duplicated and misaddressed rows, aborts or stalls.

``KVPEER_FUZZ_EXAMPLES`` (default 200) scales every test; ``KVPEER_FUZZ_REPORT``
names a JSON file for the inputs tried and statuses seen per method.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.endpoint import parse_endpoint
from kvpeer.api.errors import WireError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.limits import MAX_KEY_BYTES, MAX_REQUEST_BYTES, MAX_STATUS_DETAILS_BYTES
from kvpeer.api.wire import (
    MAX_HEADER_BYTES,
    chunk_header,
    decode_chunk,
    decode_chunk_header,
    digest,
    encode_chunk,
)
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PULL_TRANSPORTS, PeerClient, PullTarget
from kvpeer.server.peer.array_source import ArrayChunkSource
from kvpeer.server.peer.service import PeerServer
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.v1 import directory_pb2 as dpb
from kvpeer.v1 import fingerprint_pb2, peer_pb2
from tests.support.chunk_node import ChunkNode
from tests.support.directory import FP_A, FP_B, DirectoryHarness
from tests.support.directory import keys as directory_keys
from tests.support.fuzz import (
    EXAMPLES,
    REPORT_PATH,
    FuzzInput,
    Hint,
    Outcome,
    Tally,
    call_raw,
    check_outcome,
    from_pool,
    fuzz_inputs,
    fuzz_settings,
    message_strategy,
    mutate,
    mutations,
    random_bodies,
    rss_bytes,
    uniform_bytes,
)
from tests.support.h2server import ScriptedServer, grpc_message, response
from tests.support.peer import FINGERPRINT, serve_rows, targets_for, wait_until
from tests.support.redis_server import RedisServer

Code = grpc.StatusCode
TALLY = Tally()
#: Options of the fuzzing clients' channels: no limit on what the servers answer.
UNLIMITED = [("grpc.max_receive_message_length", -1)]
#: Memory a server process may gain over a fuzz run before it counts as a leak.
RSS_GROWTH_LIMIT = 64 << 20
#: Inputs per method before the first RSS reading (allocator and caches settle), and after.
WARM_UP_EXAMPLES = max(1, EXAMPLES // 8)
RSS_EXAMPLES = max(1, EXAMPLES // 2)


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Prints the inputs tried per method at the end, and writes KVPEER_FUZZ_REPORT."""
    yield TALLY
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(TALLY.lines()))
    if REPORT_PATH:
        TALLY.write(REPORT_PATH)


def request_or_refusal(cls: type[Message], fuzz: FuzzInput, outcome: Outcome) -> Message | None:
    """The request as the server parsed it; None after checking the status of one it could not.

    Bodies above the request limit must end RESOURCE_EXHAUSTED (gRPC's own check),
    bodies that do not parse INVALID_ARGUMENT naming the message.
    """
    if len(fuzz.body) > MAX_REQUEST_BYTES:
        assert outcome.code == Code.RESOURCE_EXHAUSTED, (outcome.code, outcome.details)
        return None
    try:
        return cls.FromString(fuzz.body)
    except DecodeError:
        assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)
        assert "malformed" in outcome.details, outcome.details
        return None


def expect(outcome: Outcome, code: Code, fuzz: FuzzInput) -> None:
    assert outcome.code == code, (
        f"expected {code.name}, got {outcome.code.name} {outcome.details[:300]!r} for {fuzz!r}"
    )


def single_response(cls: type[Message], outcome: Outcome) -> Message:
    (raw,) = outcome.messages
    return cls.FromString(raw)


# == KVPeer =================================================================================

PEER_CHUNKS = 8
PEER_CHUNK_BYTES = 1024
PEER_SEED = 5
PEER_LEASE_TTL_S = 600.0
PEER_MAX_KEYS = 4096
#: Leases this test holds at most before it releases the oldest (the server allows 1,024).
PEER_LEASE_POOL = 48
PEER_METHODS = {
    "Handshake": peer_pb2.HandshakeRequest,
    "Lookup": peer_pb2.LookupRequest,
    "Pull": peer_pb2.PullRequest,
    "Release": peer_pb2.ReleaseRequest,
}
OTHER_FINGERPRINT = Fingerprint(dict(FINGERPRINT.ingredients) | {"model": "someone/else"})


@dataclass
class LeaseModel:
    """A lease the fuzz test holds: the keys its Lookup asked for and which of them hit."""

    keys: tuple[bytes, ...]
    hits: list[bool]


class PeerModel:
    """What a fuzzed peer server must answer, and the leases this test holds on it.

    Calls are made one at a time from the test thread, so the model is exact:
    every lease the server grants comes back in an OK Lookup answer and is recorded.
    """

    def __init__(self, channel: grpc.Channel, keys: Sequence[bytes], rows: np.ndarray) -> None:
        self.channel = channel
        self.keys = list(keys)
        self.rows = {key: bytes(row) for key, row in zip(keys, rows, strict=True)}
        self.leases: dict[str, LeaseModel] = {}

    # -- inputs ------------------------------------------------------------------------

    def hints(self, method: str) -> dict[str, Hint]:
        known = [*self.keys, b"missing-key".ljust(36, b"\0"), b"m"]
        lease_ids = st.tuples(
            from_pool(lambda: list(self.leases), "AAAAAAAAAAAAAAAAAAAAAAAA"), st.integers(0, 5)
        ).map(_lease_variant)
        hints: dict[str, Hint] = {
            "node_id": st.sampled_from(["fuzz-client", "n0"]),
            "lease_id": lease_ids,
            "indices": st.lists(st.integers(0, PEER_CHUNKS + 2), max_size=10),
        }
        if method == "Handshake":
            hints |= {
                "protocol_version": st.just(PROTOCOL_VERSION),
                "chunk_bytes": st.just(PEER_CHUNK_BYTES),
                "fingerprint": st.just(FINGERPRINT.to_proto()),
            }
        if method == "Lookup":
            hints |= {
                "fingerprint": st.just(FINGERPRINT.digest),
                "keys": st.lists(st.sampled_from(known), min_size=1, max_size=12),
                "hold": st.just(True),
                "wait_ms": st.sampled_from([0, 1, 30]),
            }
        return hints

    def well_formed(self, method: str) -> st.SearchStrategy[Message]:
        """Requests that should succeed: lookups of known keys, pulls and releases of live leases."""
        known = [*self.keys, b"missing-key".ljust(36, b"\0")]
        lease = from_pool(lambda: list(self.leases.items()), ("none", LeaseModel((), [])))

        def pull(pair: tuple[tuple[str, LeaseModel], int]) -> peer_pb2.PullRequest:
            (lease_id, held), mask = pair
            chosen = [i for i, hit in enumerate(held.hits) if hit and mask >> i & 1]
            return peer_pb2.PullRequest(lease_id=lease_id, indices=chosen)

        return {
            "Handshake": st.just(
                peer_pb2.HandshakeRequest(
                    protocol_version=PROTOCOL_VERSION,
                    node_id="fuzz-client",
                    chunk_bytes=PEER_CHUNK_BYTES,
                    fingerprint=FINGERPRINT.to_proto(),
                )
            ),
            "Lookup": st.builds(
                peer_pb2.LookupRequest,
                fingerprint=st.just(FINGERPRINT.digest),
                keys=st.lists(st.sampled_from(known), min_size=1, max_size=12),
                hold=st.booleans(),
            ),
            "Pull": st.tuples(lease, st.integers(0, 2**PEER_CHUNKS - 1)).map(pull),
            "Release": lease.map(lambda pair: peer_pb2.ReleaseRequest(lease_id=pair[0])),
        }[method]

    def inputs(self, method: str) -> st.SearchStrategy[FuzzInput]:
        adversarial = message_strategy(
            PEER_METHODS[method],
            hints=self.hints(method),
            fingerprints=[FINGERPRINT, OTHER_FINGERPRINT],
        )
        return fuzz_inputs(st.one_of(adversarial, self.well_formed(method)))

    # -- one call ----------------------------------------------------------------------

    def send(self, method: str, fuzz: FuzzInput, target: str) -> None:
        """Send ``fuzz`` on ``method``, record it, and check the answer against the model."""
        if len(self.leases) < 4:
            self.hold_some()
        outcome = call_raw(
            self.channel, f"/kvpeer.v1.KVPeer/{method}", fuzz.body, stream=method == "Pull"
        )
        TALLY.record(target, fuzz.kind, outcome.code.name)
        check_outcome(outcome, PEER_ALLOWED[method], target, fuzz)
        request = request_or_refusal(PEER_METHODS[method], fuzz, outcome)
        if request is not None:
            getattr(self, f"_check_{method.lower()}")(request, fuzz, outcome)

    def _check_handshake(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._handshake_code(request), fuzz)
        if outcome.code == Code.OK:
            response = single_response(peer_pb2.HandshakeResponse, outcome)
            assert response.protocol_version == PROTOCOL_VERSION
            assert response.chunk_bytes == PEER_CHUNK_BYTES
            assert Fingerprint.from_proto(response.fingerprint) == FINGERPRINT
            assert response.max_keys_per_lookup == PEER_MAX_KEYS

    @staticmethod
    def _handshake_code(request: Message) -> Code:
        if not request.HasField("fingerprint"):
            return Code.OK
        try:
            theirs = Fingerprint.from_proto(request.fingerprint)
        except WireError:
            return Code.INVALID_ARGUMENT
        if len(request.node_id) > 128 or not request.node_id.isprintable():
            return Code.INVALID_ARGUMENT
        if (
            request.protocol_version != PROTOCOL_VERSION
            or request.chunk_bytes != PEER_CHUNK_BYTES
            or theirs.digest != FINGERPRINT.digest
        ):
            return Code.FAILED_PRECONDITION
        return Code.OK

    def _check_lookup(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        keys = tuple(request.keys)
        if request.fingerprint != FINGERPRINT.digest:
            code = Code.FAILED_PRECONDITION
        elif (
            not keys
            or len(keys) > PEER_MAX_KEYS
            or not all(0 < len(k) <= MAX_KEY_BYTES for k in keys)
        ):
            code = Code.INVALID_ARGUMENT
        else:
            code = Code.OK
        expect(outcome, code, fuzz)
        if code != Code.OK:
            return
        response = single_response(peer_pb2.LookupResponse, outcome)
        hits = [key in self.rows for key in keys]
        assert list(response.hit) == hits
        assert response.lease_ttl_ms == PEER_LEASE_TTL_S * 1000
        assert bool(response.lease_id) == (request.hold and any(hits))
        if response.lease_id:
            assert response.lease_id not in self.leases, "a lease id was handed out twice"
            self.leases[response.lease_id] = LeaseModel(keys, hits)
            if len(self.leases) > PEER_LEASE_POOL:
                self.release(list(self.leases)[: PEER_LEASE_POOL // 2])

    def _check_pull(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        lease = self.leases.get(request.lease_id)
        indices = list(request.indices)
        if lease is None:
            code = Code.NOT_FOUND
        elif indices and (
            len(set(indices)) != len(indices)
            or any(i >= len(lease.keys) or not lease.hits[i] for i in indices)
        ):
            code = Code.INVALID_ARGUMENT
        else:
            code = Code.OK
        expect(outcome, code, fuzz)
        if code != Code.OK:
            assert not outcome.messages, "a refused Pull streamed rows"
            return
        wanted = indices or [i for i, hit in enumerate(lease.hits) if hit]
        frames = [decode_chunk(message) for message in outcome.messages]
        assert [frame.index for frame in frames] == wanted
        for frame in frames:
            key = lease.keys[frame.index]
            assert frame.key == key
            assert bytes(frame.data) == self.rows[key], f"row {frame.index} is not byte-exact"
            assert frame.digest == digest(frame.data)

    def _check_release(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        known = request.lease_id in self.leases
        expect(outcome, Code.OK if known else Code.NOT_FOUND, fuzz)
        if known:
            del self.leases[request.lease_id]

    # -- upkeep ------------------------------------------------------------------------

    def hold_some(self) -> None:
        """Take leases for Pull and Release to aim at: all keys, a hit and a miss, one key."""
        for keys in (
            self.keys,
            [self.keys[1], b"missing".ljust(36, b"\0"), self.keys[3]],
            self.keys[-1:],
        ):
            request = peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest, keys=keys, hold=True)
            outcome = call_raw(
                self.channel, "/kvpeer.v1.KVPeer/Lookup", request.SerializeToString(), stream=False
            )
            assert outcome.code == Code.OK, (outcome.code, outcome.details)
            answer = single_response(peer_pb2.LookupResponse, outcome)
            self.leases[answer.lease_id] = LeaseModel(tuple(keys), list(answer.hit))

    def release(self, lease_ids: Sequence[str] | None = None) -> None:
        """Release leases this test holds (all by default) with well-formed calls."""
        for lease_id in list(self.leases) if lease_ids is None else lease_ids:
            body = peer_pb2.ReleaseRequest(lease_id=lease_id).SerializeToString()
            outcome = call_raw(self.channel, "/kvpeer.v1.KVPeer/Release", body, stream=False)
            assert outcome.code == Code.OK, (outcome.code, outcome.details)
            del self.leases[lease_id]


PEER_ALLOWED = {
    "Handshake": frozenset(
        {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
    ),
    "Lookup": frozenset({Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}),
    "Pull": frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}),
    "Release": frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}),
}


def _lease_variant(pair: tuple[str, int]) -> str:
    """A real lease id (variant 0) or one that looks real: cut, extended, case-flipped."""
    lease_id, variant = pair
    return [
        lease_id,
        lease_id,
        lease_id[:-1],
        lease_id + "A",
        lease_id.swapcase(),
        lease_id + "\x00",
    ][variant]


@dataclass
class PeerUnderFuzz:
    server: PeerServer
    source: ArrayChunkSource
    model: PeerModel


@pytest.fixture(scope="module")
def peer() -> Iterator[PeerUnderFuzz]:
    with (
        serve_rows(
            PEER_CHUNKS,
            PEER_CHUNK_BYTES,
            seed=PEER_SEED,
            lease_ttl_s=PEER_LEASE_TTL_S,
            max_lookup_wait_s=0.05,
            max_keys_per_lookup=PEER_MAX_KEYS,
        ) as node,
        grpc.insecure_channel(node.endpoint, UNLIMITED) as channel,
    ):
        yield PeerUnderFuzz(node.server, node.source, PeerModel(channel, node.keys, node.rows))


def assert_peer_serves_correctly(peer: PeerUnderFuzz) -> None:
    """After a fuzz run: every pin released, and a real client pulls byte-exact rows."""
    model = peer.model
    model.release()
    wait_until(lambda: peer.source.total_pins() == 0, "every pin released")
    assert peer.server.stats()["leases_live"] == 0
    endpoint = f"127.0.0.1:{peer.server.port}"
    with PeerClient(
        endpoint, node_id="after-fuzz", fingerprint=FINGERPRINT, chunk_bytes=PEER_CHUNK_BYTES
    ) as client:
        answer = client.lookup(model.keys)
        dest = np.zeros((PEER_CHUNKS, PEER_CHUNK_BYTES), dtype=np.uint8)
        result = client.pull(answer.lease_id, targets_for(model.keys, dest), streams=2)
        client.release(answer.lease_id)
    assert result.complete, result.error
    assert [bytes(row) for row in dest] == [model.rows[key] for key in model.keys]
    wait_until(lambda: peer.source.total_pins() == 0, "the check's pins released")


def fuzz_method(model: PeerModel | DirectoryModel, method: str, target: str, examples: int) -> None:
    """Send ``examples`` hypothesis-drawn inputs on ``method`` through ``model``'s checks."""

    @fuzz_settings(examples)
    @given(model.inputs(method))
    def run(fuzz: FuzzInput) -> None:
        model.send(method, fuzz, target)

    run()


@pytest.mark.parametrize("method", list(PEER_METHODS))
def test_peer_method_answers_hostile_input_meaningfully(peer: PeerUnderFuzz, method: str) -> None:
    fuzz_method(peer.model, method, f"KVPeer/{method}", EXAMPLES)
    assert_peer_serves_correctly(peer)


# == Directory ==============================================================================

DIRECTORY_METHODS = {
    method.name: getattr(dpb, method.input_type.name)
    for method in dpb.DESCRIPTOR.services_by_name["Directory"].methods
}
DIRECTORY_LEASE_TTL_S = 600.0
NODE_IDS = ["n0", "n1", "n2", "n3"]
#: Registrations a fuzz run keeps at most (it makes the oldest leave beyond).
MAX_FUZZ_NODES = 12
GOOD_ENDPOINTS = ["n0.test:7601", "10.0.0.1:7601", "[::1]:7601", "[fe80::1%eth0]:7601"]
DIRECTORY_KEYS = directory_keys(24)
_DIGEST = re.compile(r"[0-9a-f]{32}")
#: What peers can dial: a host name, IPv4 or bracketed IPv6 address, and a port.
_DIALABLE = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9\-._]*|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9\-._]+)?\]):\d{1,5}"
)
_REQUEST_CODES = frozenset({Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED})
_NODE_CODES = _REQUEST_CODES | {Code.NOT_FOUND, Code.FAILED_PRECONDITION}
#: Refusals each directory method documents (proto/kvpeer/v1/directory.proto).
DIRECTORY_ALLOWED = {
    "Join": _REQUEST_CODES,
    "Heartbeat": _NODE_CODES,
    "Publish": _NODE_CODES,
    "Withdraw": _NODE_CODES,
    "Locate": _REQUEST_CODES,
    "Leave": _NODE_CODES,
    "ListNodes": _REQUEST_CODES,
    "Stats": _REQUEST_CODES,
}


@dataclass
class Registration:
    epoch: int
    endpoint: str
    fingerprint: str
    keys: set[bytes] = field(default_factory=set)


def _valid_node_id(node_id: str) -> bool:
    return 1 <= len(node_id) <= 128 and node_id.isprintable() and " " not in node_id


def _batch_code(keys: Sequence[bytes]) -> Code | None:
    if len(keys) > 4096:
        return Code.RESOURCE_EXHAUSTED
    if not keys or not all(0 < len(k) <= MAX_KEY_BYTES for k in keys):
        return Code.INVALID_ARGUMENT
    return None


class DirectoryModel:
    """What a fuzzed directory must answer: live registrations and their keys.

    Leases are long (600 s) and calls sequential, so nothing changes behind the
    model's back: a node is registered from its OK Join until its OK Leave or
    next Join.
    """

    def __init__(self, channel: grpc.Channel, ttl_s: float) -> None:
        self.channel = channel
        self.ttl_ms = round(ttl_s * 1000)
        self.nodes: dict[str, Registration] = {}
        self.epochs: list[int] = []  # every epoch handed out, in order

    def hints(self, method: str) -> dict[str, Hint]:
        def epochs() -> list[int]:
            return [reg.epoch for reg in self.nodes.values()] + self.epochs[-8:]

        fingerprints = (
            [FP_A.to_proto(), FP_B.to_proto()] if method == "Join" else [FP_A.digest, FP_B.digest]
        )
        return {
            "node_id": st.sampled_from(NODE_IDS),
            "epoch": from_pool(epochs, 1),
            "endpoint": st.sampled_from(GOOD_ENDPOINTS),
            "keys": st.lists(st.sampled_from(DIRECTORY_KEYS), min_size=1, max_size=30),
            "exclude_node_id": st.sampled_from(["", *NODE_IDS]),
            "fingerprint": st.sampled_from(fingerprints),
        }

    def well_formed(self, method: str) -> st.SearchStrategy[Message]:
        """Requests that should succeed: joins, and calls naming a registered (node, epoch)."""
        cls = DIRECTORY_METHODS[method]
        keys = st.lists(st.sampled_from(DIRECTORY_KEYS), min_size=1, max_size=30)
        if method == "Join":
            return st.builds(
                dpb.JoinRequest,
                node_id=st.sampled_from(NODE_IDS),
                endpoint=st.sampled_from(GOOD_ENDPOINTS),
                fingerprint=st.sampled_from([FP_A.to_proto(), FP_B.to_proto()]),
            )
        if method in ("Locate", "ListNodes"):
            digests = st.sampled_from([FP_A.digest, FP_B.digest])
            if method == "ListNodes":
                return st.builds(dpb.ListNodesRequest, fingerprint=st.one_of(st.just(""), digests))
            return st.builds(dpb.LocateRequest, fingerprint=digests, keys=keys)
        if method == "Stats":
            return st.just(dpb.StatsRequest())
        registered = from_pool(lambda: [(n, r.epoch) for n, r in self.nodes.items()], ("n0", 1))

        def build(pair: tuple[tuple[str, int], list[bytes]]) -> Message:
            (node_id, epoch), batch = pair
            fields = {"node_id": node_id, "epoch": epoch}
            return (
                cls(**fields, keys=batch)
                if "keys" in cls.DESCRIPTOR.fields_by_name
                else cls(**fields)
            )

        return st.tuples(registered, keys).map(build)

    def inputs(self, method: str) -> st.SearchStrategy[FuzzInput]:
        adversarial = message_strategy(
            DIRECTORY_METHODS[method], hints=self.hints(method), fingerprints=[FP_A, FP_B]
        )
        return fuzz_inputs(st.one_of(adversarial, self.well_formed(method)))

    def _upkeep(self, method: str, request: Message) -> None:
        """A well-formed call that must succeed; the model follows it."""
        outcome = call_raw(
            self.channel,
            f"/kvpeer.v1.Directory/{method}",
            request.SerializeToString(),
            stream=False,
        )
        assert outcome.code == Code.OK, (method, outcome.code, outcome.details)
        getattr(self, f"_check_{method.lower()}")(request, FuzzInput("upkeep", b""), outcome)

    def keep_nodes_in_range(self) -> None:
        """Two nodes registered at least (one per fingerprint), so that node calls have a
        target; at most :data:`MAX_FUZZ_NODES`, so that the state the fuzz run asks the
        directory to hold stays bounded (a memory check then measures leaks only)."""
        if len(self.nodes) < 2:
            for node_id, fp in (("n0", FP_A), ("n1", FP_B)):
                join = dpb.JoinRequest(
                    node_id=node_id, endpoint=f"{node_id}.test:7601", fingerprint=fp.to_proto()
                )
                self._upkeep("Join", join)
        for node_id in list(self.nodes)[: max(0, len(self.nodes) - MAX_FUZZ_NODES)]:
            leave = dpb.LeaveRequest(node_id=node_id, epoch=self.nodes[node_id].epoch)
            self._upkeep("Leave", leave)

    def send(self, method: str, fuzz: FuzzInput, target: str) -> None:
        self.keep_nodes_in_range()
        outcome = call_raw(self.channel, f"/kvpeer.v1.Directory/{method}", fuzz.body, stream=False)
        TALLY.record(target, fuzz.kind, outcome.code.name)
        check_outcome(outcome, DIRECTORY_ALLOWED[method], target, fuzz)
        request = request_or_refusal(DIRECTORY_METHODS[method], fuzz, outcome)
        if request is not None:
            getattr(self, f"_check_{method.lower()}")(request, fuzz, outcome)

    # -- per method ----------------------------------------------------------------------

    def _state_code(self, node_id: str, epoch: int) -> Code:
        reg = self.nodes.get(node_id)
        if reg is None:
            return Code.NOT_FOUND
        return Code.OK if reg.epoch == epoch else Code.FAILED_PRECONDITION

    def _node_code(self, request: Message, keys: Sequence[bytes] | None = None) -> Code:
        if not _valid_node_id(request.node_id) or request.epoch == 0:
            return Code.INVALID_ARGUMENT
        if keys is not None and (code := _batch_code(keys)) is not None:
            return code
        return self._state_code(request.node_id, request.epoch)

    def _check_join(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        if not _valid_node_id(request.node_id):
            expect(outcome, Code.INVALID_ARGUMENT, fuzz)
        elif request.endpoint in GOOD_ENDPOINTS and request.fingerprint in (
            FP_A.to_proto(),
            FP_B.to_proto(),
        ):
            expect(outcome, Code.OK, fuzz)
        if outcome.code != Code.OK:
            return
        response = single_response(dpb.JoinResponse, outcome)
        assert response.lease_ttl_ms == self.ttl_ms
        assert not self.epochs or response.epoch > self.epochs[-1], "epochs must only grow"
        endpoint = str(parse_endpoint(request.endpoint, key="endpoint"))
        assert _DIALABLE.fullmatch(endpoint), (
            f"accepted an endpoint peers cannot dial: {endpoint!r}"
        )
        self.epochs.append(response.epoch)
        self.nodes[request.node_id] = Registration(
            response.epoch, endpoint, request.fingerprint.digest
        )

    def _check_heartbeat(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request), fuzz)
        if outcome.code == Code.OK:
            assert single_response(dpb.HeartbeatResponse, outcome).lease_ttl_ms == self.ttl_ms

    def _check_publish(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request, request.keys), fuzz)
        if outcome.code == Code.OK:
            assert single_response(dpb.PublishResponse, outcome).accepted == len(request.keys)
            self.nodes[request.node_id].keys.update(request.keys)

    def _check_withdraw(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request, request.keys), fuzz)
        if outcome.code == Code.OK:
            held = self.nodes[request.node_id].keys
            removed = single_response(dpb.WithdrawResponse, outcome).removed
            assert removed == len(held & set(request.keys))
            held.difference_update(request.keys)

    def _check_leave(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request), fuzz)
        if outcome.code == Code.OK:
            del self.nodes[request.node_id]

    def _check_locate(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        if not _DIGEST.fullmatch(request.fingerprint):
            code = Code.INVALID_ARGUMENT
        else:
            code = _batch_code(request.keys) or Code.OK
        expect(outcome, code, fuzz)
        if code != Code.OK:
            return
        response = single_response(dpb.LocateResponse, outcome)
        assert len(response.holders) == len(request.keys)
        listed = [(n.node_id, n.epoch, n.endpoint) for n in response.nodes]
        for key, holders in zip(request.keys, response.holders, strict=True):
            got = {listed[i] for i in holders.nodes}
            want = {
                (node_id, reg.epoch, reg.endpoint)
                for node_id, reg in self.nodes.items()
                if reg.fingerprint == request.fingerprint
                and key in reg.keys
                and node_id != request.exclude_node_id
            }
            assert got == want, f"holders of {key!r}"

    def _check_listnodes(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        wanted = request.fingerprint
        expect(
            outcome,
            Code.OK if not wanted or _DIGEST.fullmatch(wanted) else Code.INVALID_ARGUMENT,
            fuzz,
        )
        if outcome.code != Code.OK:
            return
        response = single_response(dpb.ListNodesResponse, outcome)
        got = {
            (n.node_id, n.epoch, n.endpoint, n.fingerprint.digest, n.keys) for n in response.nodes
        }
        want = {
            (node_id, reg.epoch, reg.endpoint, reg.fingerprint, len(reg.keys))
            for node_id, reg in self.nodes.items()
            if not wanted or reg.fingerprint == wanted
        }
        assert got == want

    def _check_stats(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, Code.OK, fuzz)
        response = single_response(dpb.StatsResponse, outcome)
        assert response.nodes == len(self.nodes)
        assert response.keys == sum(len(reg.keys) for reg in self.nodes.values())

    def assert_serves_correctly(self) -> None:
        """A well-formed join, publish, locate and leave still work after the fuzz run."""

        def call(method: str, request: Message) -> Outcome:
            body = request.SerializeToString()
            outcome = call_raw(self.channel, f"/kvpeer.v1.Directory/{method}", body, stream=False)
            assert outcome.code == Code.OK, (method, outcome.code, outcome.details)
            return outcome

        join = dpb.JoinRequest(
            node_id="after-fuzz", endpoint="after.test:7601", fingerprint=FP_B.to_proto()
        )
        epoch = single_response(dpb.JoinResponse, call("Join", join)).epoch
        key = b"after-fuzz-key".ljust(36, b"\0")
        call("Publish", dpb.PublishRequest(node_id="after-fuzz", epoch=epoch, keys=[key]))
        located = single_response(
            dpb.LocateResponse,
            call("Locate", dpb.LocateRequest(fingerprint=FP_B.digest, keys=[key])),
        )
        assert [located.nodes[i].node_id for i in located.holders[0].nodes] == ["after-fuzz"]
        call("Leave", dpb.LeaveRequest(node_id="after-fuzz", epoch=epoch))


@dataclass
class DirectoryUnderFuzz:
    kind: str
    model: DirectoryModel


@pytest.fixture(scope="module", params=["memory", "redis"])
def directory(request: pytest.FixtureRequest) -> Iterator[DirectoryUnderFuzz]:
    redis = RedisServer().start() if request.param == "redis" else None
    harness = DirectoryHarness(request.param, redis, lease_ttl_s=DIRECTORY_LEASE_TTL_S)
    try:
        harness.start()
        with grpc.insecure_channel(harness.endpoint, UNLIMITED) as channel:
            yield DirectoryUnderFuzz(request.param, DirectoryModel(channel, DIRECTORY_LEASE_TTL_S))
    finally:
        harness.close()
        if redis is not None:
            redis.close()


@pytest.mark.parametrize("method", list(DIRECTORY_METHODS))
def test_directory_method_answers_hostile_input_meaningfully(
    directory: DirectoryUnderFuzz, method: str
) -> None:
    fuzz_method(directory.model, method, f"Directory[{directory.kind}]/{method}", EXAMPLES)
    directory.model.assert_serves_correctly()


# == Regressions found by the fuzz runs =======================================================


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Join", b"\x0a\x02\xff\xfe"),  # node_id that is not UTF-8
        ("Stats", b"\xff\xff"),  # not a message at all
        ("Locate", b"\x12\x80\x80\x80\x80\x08"),  # length prefix claiming 2 GiB
    ],
)
def test_directory_answers_unparsable_requests_invalid_argument(
    directory: DirectoryUnderFuzz, method: str, body: bytes
) -> None:
    """gRPC's own deserializer answered these INTERNAL "Exception deserializing request!"."""
    outcome = call_raw(
        directory.model.channel, f"/kvpeer.v1.Directory/{method}", body, stream=False
    )
    assert outcome.code == Code.INVALID_ARGUMENT
    assert f"malformed kvpeer.v1.{method}Request" in outcome.details


@pytest.mark.parametrize(
    "endpoint", ["h:\u00b2", "[a b]:7601", "[\x00]:7601", "abc\n:7601", "[::1\n]:7601"]
)
def test_directory_refuses_endpoints_peers_cannot_dial(
    directory: DirectoryUnderFuzz, endpoint: str
) -> None:
    """A superscript port crashed Join (INTERNAL); whitespace in a host broke Redis Locate."""
    join = dpb.JoinRequest(node_id="odd", endpoint=endpoint, fingerprint=FP_A.to_proto())
    outcome = call_raw(
        directory.model.channel, "/kvpeer.v1.Directory/Join", join.SerializeToString(), stream=False
    )
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert "endpoint" in outcome.details


def test_locate_refuses_a_digest_with_a_trailing_newline(directory: DirectoryUnderFuzz) -> None:
    """``is_digest`` matched with ``$``, which also matches before a final newline."""
    locate = dpb.LocateRequest(fingerprint=FP_A.digest + "\n", keys=[b"k"])
    body = locate.SerializeToString()
    outcome = call_raw(directory.model.channel, "/kvpeer.v1.Directory/Locate", body, stream=False)
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert "is not a fingerprint digest" in outcome.details


def test_handshake_refusal_quoting_a_huge_digest_stays_readable(peer: PeerUnderFuzz) -> None:
    """A 100 kB forged digest was quoted whole: the client saw RESOURCE_EXHAUSTED (metadata)."""
    forged = FINGERPRINT.to_proto()
    forged.digest = "x" * 100_000
    request = peer_pb2.HandshakeRequest(
        protocol_version=PROTOCOL_VERSION, chunk_bytes=PEER_CHUNK_BYTES, fingerprint=forged
    )
    body = request.SerializeToString()
    outcome = call_raw(peer.model.channel, "/kvpeer.v1.KVPeer/Handshake", body, stream=False)
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details[:200])
    assert "does not match its ingredients" in outcome.details
    assert len(outcome.details.encode()) <= MAX_STATUS_DETAILS_BYTES


def test_join_refusal_quoting_a_huge_endpoint_stays_readable(
    directory: DirectoryUnderFuzz,
) -> None:
    """A 200 kB endpoint was quoted twice in the refusal, which no client could receive."""
    join = dpb.JoinRequest(
        node_id="big", endpoint="h" * 200_000 + "!:1", fingerprint=FP_A.to_proto()
    )
    body = join.SerializeToString()
    outcome = call_raw(directory.model.channel, "/kvpeer.v1.Directory/Join", body, stream=False)
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details[:200])
    assert outcome.details.startswith("endpoint: invalid host")
    assert outcome.details.endswith("(truncated)")
    assert len(outcome.details.encode()) <= MAX_STATUS_DETAILS_BYTES


def test_pull_refuses_an_index_named_twice(peer: PeerUnderFuzz) -> None:
    """One 1 MiB Pull of the same index ~500,000 times made the server stream that many rows."""
    model = peer.model
    lookup = peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest, keys=model.keys[:2], hold=True)
    answer = call_raw(
        model.channel, "/kvpeer.v1.KVPeer/Lookup", lookup.SerializeToString(), stream=False
    )
    lease_id = single_response(peer_pb2.LookupResponse, answer).lease_id
    model.leases[lease_id] = LeaseModel(tuple(model.keys[:2]), [True, True])
    pull = peer_pb2.PullRequest(lease_id=lease_id, indices=[1] + [0] * 300_000)
    outcome = call_raw(
        model.channel, "/kvpeer.v1.KVPeer/Pull", pull.SerializeToString(), stream=True
    )
    assert outcome.code == Code.INVALID_ARGUMENT
    assert "indices[2]: 0 is named twice" in outcome.details
    assert not outcome.messages
    model.release([lease_id])


# == Memory of a server process under a long run ==============================================


def _peer_rss_run(node: ChunkNode, model: PeerModel, examples: int) -> None:
    for method in PEER_METHODS:
        fuzz_method(model, method, f"KVPeer(process)/{method}", examples)
        assert node.process.poll() is None, "the peer server process died"
    model.release()


@pytest.mark.slow
def test_peer_server_process_memory_stays_bounded() -> None:
    """RSS of a chunk server process before and after a run of every method (warm-up first)."""
    with (
        ChunkNode(
            num_chunks=PEER_CHUNKS,
            chunk_bytes=PEER_CHUNK_BYTES,
            seed=PEER_SEED,
            extra_args=[f"--lease-ttl={PEER_LEASE_TTL_S}", "--max-lookup-wait=0.05"],
        ) as node,
        grpc.insecure_channel(node.endpoint, UNLIMITED) as channel,
    ):
        model = PeerModel(
            channel,
            synthetic_keys(PEER_CHUNKS, PEER_SEED),
            synthetic_rows(PEER_CHUNKS, PEER_CHUNK_BYTES, PEER_SEED),
        )
        _peer_rss_run(node, model, WARM_UP_EXAMPLES)
        before = rss_bytes(node.process.pid)
        _peer_rss_run(node, model, RSS_EXAMPLES)
        after = rss_bytes(node.process.pid)
    _record_rss("peer server process", before, after)
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew from {before} to {after} bytes"


def _directory_rss_run(process: DirectoryProcess, model: DirectoryModel, examples: int) -> None:
    for method in DIRECTORY_METHODS:
        fuzz_method(model, method, f"Directory(process)/{method}", examples)
        assert process.poll() is None, f"the directory process died: {process.stderr()[-2000:]}"


@pytest.mark.slow
def test_directory_process_memory_stays_bounded() -> None:
    """RSS of a ``kvpeer directory`` process (memory store) before and after a run of every method."""
    lease = ["--lease-ttl", str(DIRECTORY_LEASE_TTL_S)]
    with (
        DirectoryProcess(lease, metrics=False) as process,
        grpc.insecure_channel(process.endpoint, UNLIMITED) as channel,
    ):
        model = DirectoryModel(channel, DIRECTORY_LEASE_TTL_S)
        _directory_rss_run(process, model, WARM_UP_EXAMPLES)
        before = rss_bytes(process.pid)
        _directory_rss_run(process, model, RSS_EXAMPLES)
        after = rss_bytes(process.pid)
        model.assert_serves_correctly()
    _record_rss("directory process", before, after)
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew from {before} to {after} bytes"


def _record_rss(what: str, before: int, after: int) -> None:
    TALLY.notes[f"{what} RSS MiB before -> after"] = f"{before / 2**20:.1f} -> {after / 2**20:.1f}"


# == Client side: decoders ====================================================================


def _frames() -> st.SearchStrategy[bytes]:
    """Valid Chunk encodings: kvpeer's framing and protobuf's, any field values."""
    index = st.one_of(st.sampled_from([0, 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
    key = st.binary(max_size=80)
    data = st.binary(max_size=300)
    ours = st.builds(encode_chunk, index, key, data)
    theirs = st.builds(
        lambda i, k, d, dg: peer_pb2.Chunk(index=i, key=k, digest=dg, data=d).SerializeToString(),
        index,
        key,
        data,
        st.binary(max_size=20),
    )
    return st.one_of(ours, theirs)


def chunk_bodies() -> st.SearchStrategy[FuzzInput]:
    return st.one_of(
        _frames().map(lambda b: FuzzInput("structured", b)),
        st.tuples(_frames(), mutations()).map(lambda t: FuzzInput("mutated", mutate(*t))),
        random_bodies(around_limit=False).map(lambda b: FuzzInput("random", b)),
    )


def _decoded(message: bytes | memoryview) -> tuple[int, bytes, bytes, bytes] | str:
    try:
        frame = decode_chunk(message)
    except WireError as exc:
        return f"WireError: {exc}"
    return frame.index, frame.key, frame.digest, bytes(frame.data)


@fuzz_settings(EXAMPLES * 2)
@given(chunk_bodies())
def test_decode_chunk_survives_hostile_bytes(fuzz: FuzzInput) -> None:
    """Only WireError; never past the buffer; agrees with protobuf whenever both parse."""
    result = _decoded(fuzz.body)
    TALLY.record("wire.decode_chunk", fuzz.kind, "error" if isinstance(result, str) else "ok")
    # The same bytes inside a larger buffer whose surroundings would change any field read.
    padded = b"\x22\x04" + fuzz.body + b"\x08\x07\x12\x01k\x1a\x10" + b"\xee" * 16
    assert _decoded(memoryview(padded)[2 : 2 + len(fuzz.body)]) == result
    if isinstance(result, str):
        return
    index, key, frame_digest, data = result
    assert 0 <= index < 2**32 and len(key) <= 64 and len(frame_digest) == 16
    assert len(data) <= len(fuzz.body)
    try:
        reference = peer_pb2.Chunk.FromString(fuzz.body)
    except DecodeError:
        return
    assert (reference.index, reference.key, reference.digest, reference.data) == result


def chunk_headers() -> st.SearchStrategy[FuzzInput]:
    valid = st.builds(
        chunk_header,
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
        st.binary(min_size=16, max_size=16),
        st.integers(0, 1 << 16),
    )
    return st.one_of(
        valid.map(lambda b: FuzzInput("structured", b)),
        st.tuples(valid, mutations()).map(lambda t: FuzzInput("mutated", mutate(*t))),
        st.binary(max_size=200).map(lambda b: FuzzInput("random", b)),
    )


@fuzz_settings(EXAMPLES * 2)
@given(chunk_headers())
def test_decode_chunk_header_survives_hostile_bytes(fuzz: FuzzInput) -> None:
    """Only WireError; a header it accepts, followed by its data, decodes as the same Chunk."""
    try:
        header = decode_chunk_header(fuzz.body)
    except WireError:
        TALLY.record("wire.decode_chunk_header", fuzz.kind, "error")
        return
    TALLY.record("wire.decode_chunk_header", fuzz.kind, "ok")
    assert 0 <= header.index < 2**32 and len(header.key) <= 64 and len(header.digest) == 16
    if header.data_len <= 1 << 16:
        data = uniform_bytes(header.data_len, header.data_len)
        frame = decode_chunk(fuzz.body + data)
        assert (frame.index, frame.key, frame.digest, bytes(frame.data)) == (
            header.index,
            header.key,
            header.digest,
            data,
        )


def fingerprint_bodies() -> st.SearchStrategy[FuzzInput]:
    good = st.sampled_from([FINGERPRINT, FP_A, FP_B]).map(
        lambda fp: fp.to_proto().SerializeToString()
    )
    built = message_strategy(dpb.JoinRequest, fingerprints=[FINGERPRINT, FP_A]).map(
        lambda m: m.fingerprint.SerializeToString()
    )
    return st.one_of(
        st.one_of(good, built).map(lambda b: FuzzInput("structured", b)),
        st.tuples(good, mutations()).map(lambda t: FuzzInput("mutated", mutate(*t))),
        random_bodies(around_limit=False).map(lambda b: FuzzInput("random", b)),
    )


@fuzz_settings(EXAMPLES * 2)
@given(fingerprint_bodies())
def test_fingerprint_from_proto_survives_hostile_bytes(fuzz: FuzzInput) -> None:
    """Protobuf may refuse to parse; from_proto raises only WireError and keeps its word."""
    try:
        message = fingerprint_pb2.Fingerprint.FromString(fuzz.body)
    except DecodeError:
        TALLY.record("Fingerprint.from_proto", fuzz.kind, "unparsable")
        return
    try:
        fp = Fingerprint.from_proto(message)
    except WireError:
        TALLY.record("Fingerprint.from_proto", fuzz.kind, "error")
        return
    TALLY.record("Fingerprint.from_proto", fuzz.kind, "ok")
    assert fp.digest == message.digest
    assert dict(fp.ingredients) == dict(message.ingredients)
    assert fp.mismatch(Fingerprint(dict(message.ingredients))) is None


# == Client side: PeerClient.pull from a hostile peer ==========================================

HOSTILE_ROWS = 6
HOSTILE_CHUNK_BYTES = 256
HOSTILE_KEYS = synthetic_keys(HOSTILE_ROWS, 21)
HOSTILE_DATA = [bytes(row) for row in synthetic_rows(HOSTILE_ROWS, HOSTILE_CHUNK_BYTES, 21)]
#: What the hostile peer sends for a requested row.
ROW_ACTIONS = (
    "valid",
    "mutated",
    "garbage",
    "skip",
    "twice",
    "other_row",  # a true row of another index (requested or not)
    "stale_digest",  # another row's data with this row's digest
    "wrong_key",
    "oversized",
)
#: How the hostile peer ends a stream.
ENDINGS = ("ok", "ok", "garbage", "abort", "raise", "stall")


@dataclass(frozen=True)
class HostilePlan:
    """Per position in a Pull's indices, an action (cycled); then how the stream ends."""

    actions: tuple[str, ...]
    ops: tuple[tuple, ...]
    ending: str
    abort_code: Code
    seed: int

    @property
    def honest(self) -> bool:
        return set(self.actions) == {"valid"} and self.ending == "ok"


def _true_frame(index: int) -> bytes:
    return encode_chunk(index, HOSTILE_KEYS[index], HOSTILE_DATA[index])


class HostilePeer:
    """A real gRPC server registered as ``kvpeer.v1.KVPeer`` whose Pull follows :attr:`plan`.

    The test sets ``plan`` before each pull; handler threads only read it.
    """

    def __init__(self) -> None:
        self.plan: HostilePlan | None = None
        handler = grpc.method_handlers_generic_handler(
            "kvpeer.v1.KVPeer",
            {
                "Pull": grpc.unary_stream_rpc_method_handler(
                    self._pull, request_deserializer=peer_pb2.PullRequest.FromString
                )
            },
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def _pull(
        self, request: peer_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        plan = self.plan
        assert plan is not None
        rng = np.random.default_rng(plan.seed)
        for position, index in enumerate(request.indices):
            yield from _frames_for(plan.actions[position % len(plan.actions)], index, plan, rng)
        if plan.ending == "garbage":
            yield uniform_bytes(plan.seed, 40)
        elif plan.ending == "abort":
            context.abort(plan.abort_code, "hostile peer gives up")
        elif plan.ending == "raise":
            raise RuntimeError("hostile peer crashed")
        elif plan.ending == "stall":
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)


def _frames_for(
    action: str, index: int, plan: HostilePlan, rng: np.random.Generator
) -> list[bytes]:
    other = (index + 1 + int(rng.integers(HOSTILE_ROWS - 1))) % HOSTILE_ROWS
    if action == "valid":
        return [_true_frame(index)]
    if action == "mutated":
        return [mutate(_true_frame(index), plan.ops)]
    if action == "garbage":
        return [rng.bytes(int(rng.integers(0, 400)))]
    if action == "skip":
        return []
    if action == "twice":
        return [_true_frame(index), _true_frame(index)]
    if action == "other_row":
        return [_true_frame(other)]
    if action == "stale_digest":
        header = chunk_header(
            index, HOSTILE_KEYS[index], digest(HOSTILE_DATA[index]), HOSTILE_CHUNK_BYTES
        )
        return [header + HOSTILE_DATA[other]]
    if action == "wrong_key":
        return [encode_chunk(index, HOSTILE_KEYS[other], HOSTILE_DATA[index])]
    assert action == "oversized"
    return [encode_chunk(index, HOSTILE_KEYS[index], bytes(HOSTILE_CHUNK_BYTES + MAX_HEADER_BYTES))]


def hostile_plans() -> st.SearchStrategy[HostilePlan]:
    return st.builds(
        HostilePlan,
        actions=st.lists(st.sampled_from(ROW_ACTIONS), min_size=1, max_size=4).map(tuple),
        ops=mutations().map(tuple),
        ending=st.sampled_from(ENDINGS),
        abort_code=st.sampled_from(list(Code)[1:]),
        seed=st.integers(0, 2**32),
    )


@pytest.fixture(scope="module")
def hostile_peer() -> Iterator[HostilePeer]:
    server = HostilePeer()
    try:
        yield server
    finally:
        server.stop()


def _targets(wanted: Sequence[int]) -> tuple[np.ndarray, list[PullTarget]]:
    """A sentinel-filled buffer and targets that put row ``wanted[n]`` in its row ``n``."""
    dest = np.full((len(wanted), HOSTILE_CHUNK_BYTES), 0xAB, dtype=np.uint8)
    flat = memoryview(dest).cast("B")
    size = HOSTILE_CHUNK_BYTES
    return dest, [
        PullTarget(i, HOSTILE_KEYS[i], flat[n * size : (n + 1) * size])
        for n, i in enumerate(wanted)
    ]


def _pull(endpoint: str, transport: str, wanted: Sequence[int], streams: int, timeout_s: float):
    """``PeerClient.pull`` of ``wanted`` from ``endpoint``: (result, buffer, seconds taken)."""
    dest, targets = _targets(wanted)
    with PeerClient(
        endpoint,
        node_id="victim",
        fingerprint=FINGERPRINT,
        chunk_bytes=HOSTILE_CHUNK_BYTES,
        pull_transport=transport,
    ) as client:
        began = time.monotonic()
        result = client.pull("hostile-lease", targets, streams=streams, timeout_s=timeout_s)
        return result, dest, time.monotonic() - began


def assert_only_exact_rows_loaded(result, dest: np.ndarray, wanted: Sequence[int]) -> None:
    for n, i in enumerate(wanted):
        if result.loaded[n]:
            assert bytes(dest[n]) == HOSTILE_DATA[i], f"row {i} reported loaded but differs"
    assert result.bytes_loaded == sum(result.loaded) * HOSTILE_CHUNK_BYTES
    if not result.complete:
        assert result.error, "an incomplete pull must say why"


def _outcome_of(result) -> str:
    return "complete" if result.complete else "partial" if any(result.loaded) else "none"


WANTED_ROWS = st.lists(
    st.integers(0, HOSTILE_ROWS - 1), min_size=1, max_size=HOSTILE_ROWS, unique=True
)


@pytest.mark.parametrize("transport", PULL_TRANSPORTS)
def test_pull_from_a_hostile_peer_loads_only_exact_rows(
    hostile_peer: HostilePeer, transport: str
) -> None:
    """``pull`` never raises, never hangs, and reports loaded only rows equal to the truth."""

    @fuzz_settings(EXAMPLES)
    @given(plan=hostile_plans(), wanted=WANTED_ROWS, streams=st.integers(1, 3))
    def run(plan: HostilePlan, wanted: list[int], streams: int) -> None:
        hostile_peer.plan = plan
        timeout_s = 0.2 if plan.ending == "stall" else 20.0
        result, dest, elapsed = _pull(
            f"127.0.0.1:{hostile_peer.port}", transport, wanted, streams, timeout_s
        )
        TALLY.record(
            f"PeerClient.pull[{transport}] (hostile peer)", plan.ending, _outcome_of(result)
        )
        assert elapsed < timeout_s + 10, f"pull took {elapsed:.1f} s with a {timeout_s} s deadline"
        assert_only_exact_rows_loaded(result, dest, wanted)
        if plan.honest:
            assert result.complete, result.error

    run()


def _h2_replies() -> st.SearchStrategy[FuzzInput]:
    """Whole HTTP/2 answers to a Pull of rows 0 and 1: honest, mutated, cut short, random."""

    def honest(frames: Sequence[int]) -> bytes:
        return response([grpc_message(_true_frame(i)) for i in frames])

    frames = st.lists(st.integers(0, 1), min_size=0, max_size=3)
    return st.one_of(
        frames.map(lambda f: FuzzInput("structured", honest(f))),
        st.tuples(frames, mutations()).map(
            lambda t: FuzzInput("mutated", mutate(honest(t[0]), t[1]))
        ),
        st.binary(max_size=300).map(lambda b: FuzzInput("random", b)),
    )


def test_h2_pull_survives_hostile_http2_bytes() -> None:
    """The same guarantees when the peer's HTTP/2 stream itself is mutated or garbage.

    Only for kvpeer's own HTTP/2 client (``h2``); the ``grpc`` transport parses
    HTTP/2 in grpc-core.
    """
    transport = "h2"

    @fuzz_settings(max(1, EXAMPLES // 2))
    @given(_h2_replies())
    def run(reply: FuzzInput) -> None:
        with ScriptedServer(reply.body) as server:
            result, dest, elapsed = _pull(server.endpoint, transport, [0, 1], 1, 0.25)
        TALLY.record(
            f"PeerClient.pull[{transport}] (hostile HTTP/2)", reply.kind, _outcome_of(result)
        )
        assert elapsed < 10, f"pull took {elapsed:.1f} s with a 0.25 s deadline"
        assert_only_exact_rows_loaded(result, dest, [0, 1])

    run()
