"""Hostile input on the client side: the wire decoders, ``PeerClient.pull``, HTTP/2 bytes.

:func:`kvpeer.api.wire.decode_chunk`, :func:`kvpeer.api.wire.decode_chunk_header`
and :meth:`Fingerprint.from_proto` get random and mutated bytes;
:meth:`PeerClient.pull` streams from a hostile peer that sends garbage, mutated,
duplicated and misaddressed rows, aborts or stalls, and loads only exact rows;
the h2 pull transport survives hostile HTTP/2 bytes from a scripted server.

How many inputs, and the report of what they met: :mod:`tests.support.fuzz`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from kvpeer.api.errors import WireError
from kvpeer.api.fingerprint import Fingerprint
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
from kvpeer.v1 import directory_pb2 as dpb
from kvpeer.v1 import fingerprint_pb2, peer_pb2
from tests.support.directory import FP_A, FP_B
from tests.support.fuzz import (
    EXAMPLES,
    TALLY,
    FuzzInput,
    fuzz_settings,
    message_strategy,
    mutate,
    mutations,
    random_bodies,
    uniform_bytes,
)
from tests.support.h2server import ScriptedServer, grpc_message, response
from tests.support.peer import FINGERPRINT

Code = grpc.StatusCode
pytestmark = pytest.mark.usefixtures("fuzz_report")


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
