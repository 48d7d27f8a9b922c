"""Hostile input on the ``KVPeer`` service: every method, its regressions, a server's memory.

Each test sends structured-but-adversarial, mutated and random request bodies
(:mod:`tests.support.fuzz`) as raw bytes on one method of a real chunk server on
loopback, and checks every answer against :class:`PeerModel`, a model of what
the server must say: RESOURCE_EXHAUSTED above the request limit,
INVALID_ARGUMENT for bytes that do not parse, then the method's own rules
(fingerprints, leases, keys, indices), and for OK answers the content (hits,
rows byte for byte). Never UNKNOWN or INTERNAL, never a refusal without a
message, never a hang (every call has a deadline). Afterwards the server still
serves correctly and holds no pins. A slow test runs every method against a
server process and bounds the growth of its memory.

Scaled by ``KVPEER_FUZZ_EXAMPLES`` and reported as :mod:`tests.support.fuzz` says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import strategies as st

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.errors import WireError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.limits import MAX_KEY_BYTES, MAX_STATUS_DETAILS_BYTES
from kvpeer.api.wire import decode_chunk, digest
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PeerClient
from kvpeer.server.peer.array_source import ArrayChunkSource
from kvpeer.server.peer.service import PeerServer
from kvpeer.v1 import peer_pb2
from tests.support.chunk_node import ChunkNode
from tests.support.fuzz import (
    EXAMPLES,
    RSS_EXAMPLES,
    RSS_GROWTH_LIMIT,
    TALLY,
    UNLIMITED,
    WARM_UP_EXAMPLES,
    FuzzInput,
    Hint,
    Outcome,
    call_raw,
    check_outcome,
    expect,
    from_pool,
    fuzz_inputs,
    fuzz_method,
    message_strategy,
    record_rss,
    request_or_refusal,
    rss_bytes,
    single_response,
)
from tests.support.peer import FINGERPRINT, serve_rows, targets_for, wait_until

Code = grpc.StatusCode
pytestmark = pytest.mark.usefixtures("fuzz_report")


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


@pytest.mark.parametrize("method", list(PEER_METHODS))
def test_peer_method_answers_hostile_input_meaningfully(peer: PeerUnderFuzz, method: str) -> None:
    fuzz_method(peer.model, method, f"KVPeer/{method}", EXAMPLES)
    assert_peer_serves_correctly(peer)


# == Regressions found by the fuzz runs =======================================================


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
    record_rss("peer server process", before, after)
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew from {before} to {after} bytes"


# == Same-host fast path: MapRows, CheckLease, the handshake's Host and Region ==============

SAME_HOST_METHODS = {
    "MapRows": peer_pb2.MapRowsRequest,
    "CheckLease": peer_pb2.CheckLeaseRequest,
}
SAME_HOST_ALLOWED = frozenset(
    {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
)


@pytest.fixture(scope="module")
def shm_peer() -> Iterator[tuple[str, list[bytes], np.ndarray]]:
    """A chunk server process over a /dev/shm file (it offers its region)."""
    from tests.support.shm_node import ShmNode

    with ShmNode(num_chunks=PEER_CHUNKS, chunk_bytes=PEER_CHUNK_BYTES, seed=PEER_SEED) as node:
        yield (
            node.endpoint,
            synthetic_keys(PEER_CHUNKS, PEER_SEED),
            synthetic_rows(PEER_CHUNKS, PEER_CHUNK_BYTES, PEER_SEED),
        )


@pytest.mark.parametrize("method", list(SAME_HOST_METHODS))
def test_same_host_methods_answer_hostile_input_meaningfully(shm_peer, method: str) -> None:
    """MapRows/CheckLease on live, cut and forged lease ids and indices: a meaningful status;
    every OK MapRows row lies inside the region and carries the digest of the right row."""
    from hypothesis import given

    from tests.support.fuzz import fuzz_settings

    endpoint, keys, rows = shm_peer
    expected = {key: bytes(row) for key, row in zip(keys, rows, strict=True)}
    with grpc.insecure_channel(endpoint, UNLIMITED) as channel:
        leases: list[str] = []
        for held in (keys, keys[:2], [keys[3], b"missing".ljust(36, b"\0")]):
            body = peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest, keys=held, hold=True)
            outcome = call_raw(
                channel, "/kvpeer.v1.KVPeer/Lookup", body.SerializeToString(), stream=False
            )
            leases.append(single_response(peer_pb2.LookupResponse, outcome).lease_id)
        hints: dict[str, Hint] = {
            "lease_id": st.tuples(st.sampled_from(leases), st.integers(0, 5)).map(_lease_variant),
            "indices": st.lists(st.integers(0, PEER_CHUNKS + 2), max_size=10),
        }
        well_formed = st.builds(
            SAME_HOST_METHODS[method],
            lease_id=st.sampled_from(leases),
            **(
                {"indices": st.lists(st.integers(0, 1), max_size=2, unique=True)}
                if method == "MapRows"
                else {}
            ),
        )
        structured = st.one_of(
            message_strategy(SAME_HOST_METHODS[method], hints=hints), well_formed
        )

        @fuzz_settings(EXAMPLES)
        @given(fuzz_inputs(structured))
        def run(fuzz: FuzzInput) -> None:
            target = f"KVPeer/{method}"
            outcome = call_raw(channel, f"/kvpeer.v1.KVPeer/{method}", fuzz.body, stream=False)
            TALLY.record(target, fuzz.kind, outcome.code.name)
            check_outcome(outcome, SAME_HOST_ALLOWED, target, fuzz)
            if method != "MapRows" or outcome.code != Code.OK:
                return
            response = single_response(peer_pb2.MapRowsResponse, outcome)
            size = response.region.size
            for row in response.rows:
                assert row.offset >= 0 and row.offset + row.length <= size
                assert row.length == PEER_CHUNK_BYTES
                assert row.digest == digest(expected[row.key]), "a digest of another row"

        run()
        for lease_id in leases:
            body = peer_pb2.ReleaseRequest(lease_id=lease_id).SerializeToString()
            call_raw(channel, "/kvpeer.v1.KVPeer/Release", body, stream=False)


def test_consumer_survives_hostile_handshake_host_and_region() -> None:
    """The consumer's side of the new handshake fields: any Host/Region a peer sends is
    judged without raising, and the fast path is on only for a file that truly is the region."""
    from hypothesis import given

    from kvpeer.client.same_host import SameHostPath
    from tests.support.fuzz import fuzz_settings

    hints: dict[str, Hint] = {
        "path": st.sampled_from(
            ["/dev/shm/nope.mmap", "/etc/passwd", "/dev/shm/../etc/shadow", "", "/dev/shm/"]
        ),
        "row_bytes": st.sampled_from([0, PEER_CHUNK_BYTES, 1 << 40]),
    }
    structured = message_strategy(peer_pb2.HandshakeResponse, hints=hints)

    @fuzz_settings(EXAMPLES)
    @given(fuzz_inputs(structured))
    def run(fuzz: FuzzInput) -> None:
        TALLY.record("SameHostPath.offer", fuzz.kind, "checked")
        try:
            response = peer_pb2.HandshakeResponse.FromString(fuzz.body)
        except Exception:
            return  # the client's handshake parser refuses it before offer() sees it
        path = SameHostPath(
            "fuzz:1",
            chunk_bytes=PEER_CHUNK_BYTES,
            enabled=True,
            map_rows=lambda *a, **k: None,
            check_lease=lambda *a, **k: None,
            on_stale=lambda: None,
        )
        path.offer(response)
        assert not path.usable, "no fuzzed description names a real region"
        path.close()

    run()
