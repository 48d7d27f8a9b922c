"""The same-host fast path between a chunk server process and a PeerClient: detection and checks.

The holder is a real process whose rows live in a real ``/dev/shm`` file
(:mod:`tests.support.shm_node`). What a consumer relies on: rows copied this way
are byte-exact and verified; the path is used only on one kernel with the very
file the holder mapped; anything else (another host, no region, a file that
does not open or is another file, a lying peer) is a network pull or a failure,
never a read outside the region; and the fast path gives nothing to a caller
the network path refuses.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from concurrent import futures

import grpc
import numpy as np
import pytest

from kvpeer.api.errors import KVPeerError
from kvpeer.api.same_host import this_host
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PeerClient
from kvpeer.client.same_host import SameHostPath, _copy_row
from kvpeer.v1 import peer_pb2
from tests.support.peer import FINGERPRINT, serve_rows, targets_for
from tests.support.pull import SENTINEL, sentinel_buffer
from tests.support.shm_node import ShmNode

ROWS, SIZE, SEED = 16, 256 << 10, 4


def client_for(endpoint: str, **overrides) -> PeerClient:
    args = {"node_id": "consumer", "fingerprint": FINGERPRINT, "chunk_bytes": SIZE}
    return PeerClient(endpoint, **(args | overrides))


def pull_all(client: PeerClient, *, streams: int = 2):
    keys = synthetic_keys(ROWS, SEED)
    answer = client.lookup(keys)
    dest = sentinel_buffer(ROWS, SIZE)
    result = client.pull(answer.lease_id, targets_for(keys, dest), streams=streams)
    client.release(answer.lease_id)
    return result, dest


@pytest.fixture(scope="module")
def holder():
    with ShmNode(num_chunks=ROWS, chunk_bytes=SIZE, seed=SEED) as node:
        yield node


def test_fast_path_copies_every_byte_and_the_holder_counts_it(holder):
    with client_for(holder.endpoint) as client:
        result, dest = pull_all(client)
    assert result.complete, result.error
    assert result.same_host_rows == ROWS and result.same_host_bytes == ROWS * SIZE
    assert result.fallback is None
    assert np.array_equal(dest, synthetic_rows(ROWS, SIZE, SEED))


def test_same_host_off_pulls_the_same_bytes_over_the_network(holder):
    with client_for(holder.endpoint, same_host=False) as client:
        result, dest = pull_all(client)
    assert result.complete and result.same_host_rows == 0 and result.fallback is None
    assert np.array_equal(dest, synthetic_rows(ROWS, SIZE, SEED))


def test_a_holder_without_a_shared_file_is_pulled_over_the_network():
    with serve_rows(ROWS, SIZE, seed=SEED) as node, client_for(node.endpoint) as client:
        result, dest = pull_all(client)
    assert result.complete and result.same_host_rows == 0
    assert result.fallback == "no_region"
    assert np.array_equal(dest, synthetic_rows(ROWS, SIZE, SEED))


def test_copy_row_stops_at_the_end_of_a_truncated_file(tmp_path):
    path = f"/dev/shm/kvpeer-test-short-{uuid.uuid4().hex}"
    with open(path, "wb") as f:
        f.write(b"x" * (SIZE + 100))
    try:
        fd = os.open(path, os.O_RDONLY)
        dest = bytearray(SIZE)
        assert _copy_row(fd, 0, memoryview(dest)) is not None
        assert _copy_row(fd, 200, memoryview(dest)) is None, "a short read must fail the row"
        os.close(fd)
    finally:
        os.unlink(path)


# -- Detection: what the handshake must show before a byte is read ---------------------


class ShmFile:
    """A real /dev/shm file and a handshake response describing it (to be altered)."""

    def __init__(self, size: int = ROWS * SIZE) -> None:
        self.path = f"/dev/shm/kvpeer-test-region-{uuid.uuid4().hex}.mmap"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        st = os.fstat(fd)
        os.close(fd)
        self.response = peer_pb2.HandshakeResponse(
            host=this_host().to_proto(),
            region=peer_pb2.Region(
                path=self.path,
                size=size,
                st_dev=st.st_dev,
                st_ino=st.st_ino,
                engine_id="e",
                row_bytes=SIZE,
                num_rows=size // SIZE,
            ),
        )

    def close(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def shm_file():
    made = ShmFile()
    yield made
    made.close()


def offer(response: peer_pb2.HandshakeResponse) -> SameHostPath:
    path = SameHostPath(
        "peer:1",
        chunk_bytes=SIZE,
        enabled=True,
        map_rows=lambda *a, **k: None,
        check_lease=lambda *a, **k: None,
        on_stale=lambda: None,
    )
    path.offer(response)
    return path


def test_the_true_region_is_accepted(shm_file):
    path = offer(shm_file.response)
    assert path.usable and path.reason == ""
    path.close()


def test_another_hosts_boot_id_rules_the_fast_path_out(shm_file):
    shm_file.response.host.boot_id = "00000000-0000-0000-0000-000000000000"
    path = offer(shm_file.response)
    assert not path.usable and path.reason == "other_host"


def test_another_file_at_the_same_path_is_refused(shm_file):
    """The path names another engine's file now: the inode differs, nothing is used."""
    os.unlink(shm_file.path)
    fd = os.open(shm_file.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, ROWS * SIZE)
    os.close(fd)
    path = offer(shm_file.response)
    assert not path.usable and path.reason == "identity_mismatch"


def test_a_truncated_region_is_refused(shm_file):
    os.truncate(shm_file.path, SIZE)
    path = offer(shm_file.response)
    assert not path.usable and path.reason == "identity_mismatch"


@pytest.mark.parametrize(
    "bad_path", ["/etc/passwd", "/dev/shm/../etc/passwd", "relative.mmap", "/dev/shm/a/b"]
)
def test_paths_outside_dev_shm_are_never_opened(shm_file, bad_path):
    shm_file.response.region.path = bad_path
    path = offer(shm_file.response)
    assert not path.usable and path.reason == "path_not_allowed"


def test_a_symlink_in_dev_shm_is_not_followed(shm_file):
    link = f"/dev/shm/kvpeer-test-link-{uuid.uuid4().hex}"
    os.symlink(shm_file.path, link)
    try:
        shm_file.response.region.path = link
        path = offer(shm_file.response)
        assert not path.usable and path.reason == "open_failed"
    finally:
        os.unlink(link)


def test_a_region_the_consumer_may_not_open_is_refused(shm_file):
    """The file is another user's, mode 0600; a consumer without the right cannot open it.

    The consumer runs in a process without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
    (``capsh --drop``), so even as root it is refused as any other user would be.
    """
    capsh = shutil.which("capsh")
    if os.geteuid() != 0 or capsh is None:
        pytest.skip("needs root and capsh to run a consumer without the right to open")
    os.chown(shm_file.path, 65534, 65534)
    script = (
        "import sys, json\n"
        "from kvpeer.v1 import peer_pb2\n"
        "from tests.test_same_host import offer\n"
        "r = peer_pb2.HandshakeResponse.FromString(bytes.fromhex(sys.argv[1]))\n"
        "p = offer(r)\n"
        "print(json.dumps({'usable': p.usable, 'reason': p.reason}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = shlex.join(
        [sys.executable, "-c", script, shm_file.response.SerializeToString().hex()]
    )
    done = subprocess.run(
        [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", command],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "usable": False,
        "reason": "open_failed",
    }


# -- A lying peer: the consumer reads nothing outside the region -----------------------


class LyingPeer:
    """A KVPeer server that describes a real region but answers MapRows with ``rows``."""

    def __init__(self, shm: ShmFile, rows: list[peer_pb2.MappedRow]) -> None:
        self.shm = shm
        keys = synthetic_keys(ROWS, SEED)

        def handshake(request, context):
            response = peer_pb2.HandshakeResponse()
            response.CopyFrom(shm.response)
            response.protocol_version = 1
            response.chunk_bytes = SIZE
            response.fingerprint.CopyFrom(FINGERPRINT.to_proto())
            response.lease_ttl_ms = 30_000
            return response

        def lookup(request, context):
            return peer_pb2.LookupResponse(lease_id="L", hit=[True] * len(request.keys))

        def map_rows(request, context):
            out = peer_pb2.MapRowsResponse(region=shm.response.region)
            out.rows.extend(rows)
            return out

        def check_lease(request, context):
            return peer_pb2.CheckLeaseResponse()

        def unary(fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        handler = grpc.method_handlers_generic_handler(
            "kvpeer.v1.KVPeer",
            {
                "Handshake": unary(
                    handshake, peer_pb2.HandshakeRequest, peer_pb2.HandshakeResponse
                ),
                "Lookup": unary(lookup, peer_pb2.LookupRequest, peer_pb2.LookupResponse),
                "MapRows": unary(map_rows, peer_pb2.MapRowsRequest, peer_pb2.MapRowsResponse),
                "CheckLease": unary(
                    check_lease, peer_pb2.CheckLeaseRequest, peer_pb2.CheckLeaseResponse
                ),
            },
        )
        self.keys = keys
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers([handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


def mapped(index: int, offset: int, *, length: int = SIZE, key: bytes | None = None):
    keys = synthetic_keys(ROWS, SEED)
    return peer_pb2.MappedRow(
        index=index,
        key=keys[index] if key is None else key,
        offset=offset,
        length=length,
        digest=b"\x00" * 16,
    )


@pytest.mark.parametrize(
    "rows",
    [
        [mapped(0, ROWS * SIZE - SIZE // 2)],  # runs past the end of the region
        [mapped(0, 2**63)],  # far outside
        [mapped(0, 0, length=SIZE * 2)],  # wrong length
        [mapped(0, 0, key=b"another key")],  # wrong key
        [mapped(5, 0)],  # a row not asked for
        [mapped(0, 0), mapped(0, 0)],  # more rows than asked
    ],
    ids=["past-end", "far-outside", "length", "key", "not-asked", "extra-rows"],
)
def test_a_lying_peer_cannot_make_the_consumer_read(shm_file, rows):
    peer = LyingPeer(shm_file, rows)
    try:
        with client_for(f"127.0.0.1:{peer.port}", rpc_timeout_s=5.0) as client:
            answer = client.lookup(peer.keys[:1])
            dest = sentinel_buffer(1, SIZE)
            result = client.pull(answer.lease_id, targets_for(peer.keys[:1], dest), timeout_s=5)
    finally:
        peer.close()
    assert not any(result.loaded) and result.error
    assert result.fallback == "bad_offsets"
    assert (dest == SENTINEL).all(), "no byte may be copied from a peer that lies"


def test_a_wrong_digest_is_not_loaded(shm_file):
    """Offsets in range but the digest does not match the file's bytes: not loaded."""
    peer = LyingPeer(shm_file, [mapped(0, 0)])
    try:
        with client_for(f"127.0.0.1:{peer.port}") as client:
            answer = client.lookup(peer.keys[:1])
            dest = sentinel_buffer(1, SIZE)
            result = client.pull(answer.lease_id, targets_for(peer.keys[:1], dest), timeout_s=5)
    finally:
        peer.close()
    assert result.loaded == [False] and result.corrupt == 1


# -- Authorisation: no rows by the fast path for a caller refused on the network -------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret-token-value\n")
    with ShmNode(
        num_chunks=ROWS, chunk_bytes=SIZE, seed=SEED, extra_args=[f"--token-file={token}"]
    ) as node:
        yield node, token


def test_a_bad_token_gets_no_lease_and_no_offsets(guarded, tmp_path):
    node, token = guarded
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    from kvpeer.api.security import Security

    bad = Security.from_config(None, str(wrong))
    with client_for(node.endpoint, security=bad) as client, pytest.raises(KVPeerError):
        client.lookup(synthetic_keys(ROWS, SEED))
    # Even with a live lease id taken by an authorised caller, MapRows needs the token.
    with client_for(node.endpoint, security=Security.from_config(None, str(token))) as good:
        answer = good.lookup(synthetic_keys(ROWS, SEED))
        channel = grpc.insecure_channel(node.endpoint)
        try:
            stub = channel.unary_unary(
                "/kvpeer.v1.KVPeer/MapRows",
                request_serializer=peer_pb2.MapRowsRequest.SerializeToString,
                response_deserializer=peer_pb2.MapRowsResponse.FromString,
            )
            for metadata in ((), (("authorization", "Bearer not-the-token"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    stub(peer_pb2.MapRowsRequest(lease_id=answer.lease_id), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            channel.close()
            good.release(answer.lease_id)


def test_an_authorised_consumer_uses_the_fast_path_with_the_token(guarded):
    node, token = guarded
    from kvpeer.api.security import Security

    with client_for(node.endpoint, security=Security.from_config(None, str(token))) as client:
        result, dest = pull_all(client)
    assert result.complete and result.same_host_rows == ROWS
    assert np.array_equal(dest, synthetic_rows(ROWS, SIZE, SEED))
