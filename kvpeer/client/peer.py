"""Client of a peer's KVPeer service: handshake, lookup, pull into caller memory, release.

The vLLM tier keeps one :class:`PeerClient` per peer in a :class:`PeerClientPool`
and calls it from its background threads:

    client = pool.get("prefill-0:7601")
    answer = client.lookup(keys, hold=True)              # pins the hits on the peer
    result = client.pull(answer.lease_id, targets, streams=4)
    client.release(answer.lease_id)

``pull`` writes each received row straight into the caller's ``dest`` view, checks
the XXH3-128 digest of the bytes as written and the key, and only then reports
the row loaded. It never raises for transport failures: a dead peer, a deadline
or a corrupt row ends as ``loaded`` flags plus a readable ``error``, so the caller
falls back to recomputing.

Pulls have two transports (``pull_transport``), which behave alike:

- ``"h2"`` (default): :mod:`kvpeer.transport.pull_client`, a minimal HTTP/2 client that
  receives each row with ``recv_into`` straight into ``dest`` (the kernel's copy
  only), about twice grpcio's throughput here; each stream has a connection of
  its own, kept for the next pull for a few seconds. It dials the peer's pull
  port, which the handshake advertises (the peer sends rows there without
  copying them), when it reached the peer on the peer's own port, else the port
  it dialled (see :mod:`kvpeer.transport.pull_client`);
- ``"grpc"``: grpcio's stream; each row is copied once from gRPC's message into
  ``dest`` (numpy, so the GIL is released and streams copy in parallel).

Handshake, lookup and release always go through grpcio.

When the peer is on the same host and offers its shared-memory region, ``pull``
copies the rows from there instead (:mod:`kvpeer.client.same_host`, ``same_host``),
falling back to the network pull above.

Why it is long: one client of one service; the transports' own code lives in
:mod:`kvpeer.transport`, :mod:`.pull_job` and :mod:`.same_host`, what stays is the
calls and the checks every transport shares.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.endpoint import parse_endpoint
from kvpeer.api.errors import (
    ConfigError,
    IncompatiblePeerError,
    KVPeerError,
    PeerUnavailableError,
    WireError,
)
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.same_host import this_host
from kvpeer.api.security import Security
from kvpeer.api.wire import MAX_HEADER_BYTES, digest
from kvpeer.client.pull_job import GrpcRowStream, PullJob, PullResult, PullTarget, RowStream
from kvpeer.client.same_host import SameHostPath
from kvpeer.transport.connection import CallError
from kvpeer.transport.pull_client import H2PullTransport
from kvpeer.v1 import peer_pb2

__all__ = [
    "PULL_TRANSPORTS",
    "LookupAnswer",
    "PeerClient",
    "PeerClientPool",
    "PeerInfo",
    "PullResult",
    "PullTarget",
    "channel_options",
]

log = logging.getLogger(__name__)

_SERVICE = "/kvpeer.v1.KVPeer/"
#: Release is best effort: never hold the caller longer than this.
_RELEASE_TIMEOUT_S = 2.0
#: How often a pull with a ``cancel`` event checks it while streams run.
_CANCEL_POLL_S = 0.02
_UNAVAILABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
#: Values of ``pull_transport``.
PULL_TRANSPORTS = ("h2", "grpc")


@dataclass(frozen=True)
class PeerInfo:
    """What a peer said about itself in the handshake."""

    node_id: str
    protocol_version: int
    chunk_bytes: int
    fingerprint: Fingerprint
    max_keys_per_lookup: int
    lease_ttl_s: float
    #: The peer's fast Pull port (0: none).
    pull_port: int = 0


@dataclass(frozen=True)
class LookupAnswer:
    """A peer's answer to a lookup. ``lease_id`` is empty unless ``hold`` pinned a hit."""

    lease_id: str
    hits: list[bool]
    lease_ttl_s: float


class PeerClient:
    """Client of one peer's KVPeer service; thread-safe; owns its channel(s).

    Args:
        endpoint: the peer's ``host:port``.
        node_id: this node's name (sent for the peer's logs).
        fingerprint: this node's fingerprint; the peer must have the same digest.
        chunk_bytes: this node's row size; the peer must use the same.
        security: TLS and token for the channel.
        rpc_timeout_s: deadline of handshake and lookup calls.
        channels: gRPC connections to the peer; with the ``grpc`` transport a
            pull's streams are spread over them round-robin. On a 2-core machine
            several connections did not beat several streams on one
            (benchmarks/pull_throughput.py --channels), so one is the default;
            control calls always use the first.
        pull_transport: ``"h2"`` (default; a connection per pull stream, rows
            received in place) or ``"grpc"``; see the module docstring.
        use_pull_port: with ``h2``, pull from the port the peer advertises for
            Pull (default); False pulls from ``endpoint`` (benchmarks compare both).
        same_host: use the same-host fast path when the handshake allows it
            (default); False always pulls over the network.

    Raises:
        ConfigError: ``pull_transport`` is not one of :data:`PULL_TRANSPORTS`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        node_id: str,
        fingerprint: Fingerprint,
        chunk_bytes: int,
        security: Security | None = None,
        rpc_timeout_s: float = 5.0,
        channels: int = 1,
        pull_transport: str = "h2",
        use_pull_port: bool = True,
        same_host: bool = True,
    ) -> None:
        _check_transport(pull_transport)
        address = parse_endpoint(endpoint, key="peer endpoint")
        self.endpoint = str(address)
        self._node_id = node_id
        self._fingerprint = fingerprint
        self._chunk_bytes = chunk_bytes
        self._rpc_timeout_s = rpc_timeout_s
        security = security or Security()
        options = channel_options(chunk_bytes)
        if channels > 1:
            # A local subchannel pool gives each channel its own TCP connection.
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._channels = [
            security.open_channel(self.endpoint, options) for _ in range(max(1, channels))
        ]
        main = self._channels[0]
        self._handshake_rpc = _unary(
            main, "Handshake", peer_pb2.HandshakeRequest, peer_pb2.HandshakeResponse
        )
        self._lookup_rpc = _unary(main, "Lookup", peer_pb2.LookupRequest, peer_pb2.LookupResponse)
        self._release_rpc = _unary(
            main, "Release", peer_pb2.ReleaseRequest, peer_pb2.ReleaseResponse
        )
        self._same_host = SameHostPath(
            self.endpoint,
            chunk_bytes=chunk_bytes,
            enabled=same_host,
            map_rows=_unary(main, "MapRows", peer_pb2.MapRowsRequest, peer_pb2.MapRowsResponse),
            check_lease=_unary(
                main, "CheckLease", peer_pb2.CheckLeaseRequest, peer_pb2.CheckLeaseResponse
            ),
            on_stale=self._forget_handshake,
        )
        self._pull_rpcs = [
            ch.unary_stream(
                _SERVICE + "Pull",
                request_serializer=None,  # requests are serialized once per stream
                response_deserializer=None,  # raw bytes: rows are decoded in place
                _registered_method=True,
            )
            for ch in self._channels
        ]
        self._h2 = None
        if pull_transport == "h2":
            self._h2 = H2PullTransport(
                address,
                security=security,
                chunk_bytes=chunk_bytes,
                on_pull_port_lost=self._forget_handshake,
            )
        self._use_pull_port = use_pull_port
        self._next_channel = itertools.count()
        self._handshake_lock = threading.Lock()
        self._info: PeerInfo | None = None
        self._closed = False

    # -- control calls ---------------------------------------------------------

    def handshake(self) -> PeerInfo:
        """Exchange versions and fingerprints once; later calls return the cached info.

        Raises:
            IncompatiblePeerError: protocol version, chunk size or fingerprint differ;
                the message names the field (and each differing ingredient).
            PeerUnavailableError: the peer did not answer in time.
        """
        with self._handshake_lock:
            if self._info is not None:
                return self._info
            request = peer_pb2.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION,
                node_id=self._node_id,
                chunk_bytes=self._chunk_bytes,
                fingerprint=self._fingerprint.to_proto(),
                host=this_host().to_proto(),
            )
            response = self._call(self._handshake_rpc, request, self._rpc_timeout_s, "handshake")
            self._info = self._check_handshake(response)
            self._same_host.offer(response)
            if self._h2 is not None and self._use_pull_port:
                self._h2.use_pull_port(response.pull_port, response.listen_port)
            return self._info

    def _forget_handshake(self) -> None:
        """The peer's pull port refused us (it restarted?): handshake again before the next lookup."""
        with self._handshake_lock:
            self._info = None

    def lookup(
        self,
        keys: Sequence[bytes],
        *,
        hold: bool = True,
        handoff_id: str = "",
        wait_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> LookupAnswer:
        """Ask which ``keys`` the peer holds; with ``hold`` it pins the hits under a lease.

        Handshakes first if needed. ``wait_s`` lets the peer wait for keys of
        ``handoff_id`` not stored yet (it caps the wait). The call's deadline is
        ``timeout_s``, by default ``rpc_timeout_s + wait_s``.

        Raises:
            PeerUnavailableError: unreachable or no answer in time.
            IncompatiblePeerError: the handshake or the fingerprint check failed.
            KVPeerError: the peer refused the request; the message is the peer's.
        """
        self.handshake()
        request = peer_pb2.LookupRequest(
            fingerprint=self._fingerprint.digest,
            keys=list(keys),
            hold=hold,
            handoff_id=handoff_id,
            wait_ms=max(0, round(wait_s * 1000)),
            node_id=self._node_id,
        )
        timeout = self._rpc_timeout_s + wait_s if timeout_s is None else timeout_s
        response = self._call(self._lookup_rpc, request, timeout, "lookup")
        hits = list(response.hit)
        if len(hits) != len(request.keys):
            raise WireError(
                f"peer {self.endpoint} answered {len(hits)} hit flags for {len(request.keys)} keys"
            )
        if hold and any(hits) and not response.lease_id:
            raise WireError(f"peer {self.endpoint} pinned hits without a lease id")
        return LookupAnswer(response.lease_id, hits, response.lease_ttl_ms / 1000)

    def release(self, lease_id: str) -> None:
        """Unpin a lease; best effort, never raises (an expired lease is already free)."""
        if not lease_id or self._closed:
            return
        timeout = min(self._rpc_timeout_s, _RELEASE_TIMEOUT_S)
        try:
            self._release_rpc(peer_pb2.ReleaseRequest(lease_id=lease_id), timeout=timeout)
        except (grpc.RpcError, ValueError) as exc:
            log.debug("release of lease on %s failed: %s", self.endpoint, _describe(exc))

    # -- data plane --------------------------------------------------------------

    def pull(
        self,
        lease_id: str,
        targets: Sequence[PullTarget],
        *,
        streams: int = 1,
        timeout_s: float = 60.0,
        cancel: threading.Event | None = None,
    ) -> PullResult:
        """Stream the rows of ``targets`` from a lease into their ``dest`` views.

        The targets are dealt round-robin over ``streams`` concurrent Pull calls
        (threads), so rows arrive roughly in target order. The whole pull shares one
        deadline, ``timeout_s`` from now; setting ``cancel`` stops it at once.
        Transport failures, a dead peer, bad frames and digest mismatches are
        reported in the result, never raised: rows that arrived verified before the
        failure stay loaded. On the same host the rows are copied from the peer's
        region instead when the handshake allowed it (:mod:`.same_host`).

        Raises:
            ValueError: a ``dest`` is not a writable 1-D byte view of ``chunk_bytes``,
                or two targets name the same index (programming errors).
        """
        for target in targets:
            self._dest_array(target)
        if len({t.index for t in targets}) != len(targets):
            raise ValueError("two pull targets name the same index")
        return self._same_host.pull(
            lease_id,
            targets,
            streams=streams,
            timeout_s=timeout_s,
            cancel=cancel,
            network=self._network_pull,
        )

    def _network_pull(
        self,
        lease_id: str,
        targets: Sequence[PullTarget],
        streams: int,
        timeout_s: float,
        cancel: threading.Event | None,
    ) -> PullResult:
        """:meth:`pull` over the network (h2 or grpcio), whatever the host."""
        started = time.perf_counter()
        dests = [self._dest_array(t) for t in targets]
        count = max(1, min(streams, len(targets)))
        job = PullJob(self.endpoint, len(targets), count)
        try:
            if targets:
                self._run_streams(lease_id, targets, dests, count, timeout_s, cancel, job)
        finally:
            dests.clear()  # drop our exports of the caller's buffers before returning
        return job.result(time.perf_counter() - started)

    def close(self) -> None:
        """Close the channel(s); calls in progress fail, later calls raise or report."""
        self._closed = True
        self._same_host.close()
        if self._h2 is not None:
            self._h2.close()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- private -------------------------------------------------------------------

    def _call(self, rpc: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float, what: str):
        if self._closed:
            raise PeerUnavailableError(f"{what} on {self.endpoint}: the client is closed")
        try:
            return rpc(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, f"{what} on peer {self.endpoint}") from None
        except ValueError as exc:  # the channel was closed by another thread
            raise PeerUnavailableError(f"{what} on {self.endpoint}: {exc}") from None

    def _check_handshake(self, response: peer_pb2.HandshakeResponse) -> PeerInfo:
        peer = f"peer {self.endpoint} ({response.node_id or 'unnamed'})"
        try:
            theirs = Fingerprint.from_proto(response.fingerprint)
        except WireError as exc:
            raise IncompatiblePeerError(f"{peer} sent an invalid fingerprint: {exc}") from None
        if response.protocol_version != PROTOCOL_VERSION:
            raise IncompatiblePeerError(
                f"{peer}: protocol_version differs (ours {PROTOCOL_VERSION}, theirs "
                f"{response.protocol_version}): upgrade all nodes to the same kvpeer release"
            )
        if response.chunk_bytes != self._chunk_bytes:
            raise IncompatiblePeerError(
                f"{peer}: chunk_bytes differs (ours {self._chunk_bytes}, theirs "
                f"{response.chunk_bytes})"
            )
        reason = self._fingerprint.mismatch(theirs)
        if reason is not None:
            raise IncompatiblePeerError(f"{peer}: {reason}")
        return PeerInfo(
            node_id=response.node_id,
            protocol_version=response.protocol_version,
            chunk_bytes=response.chunk_bytes,
            fingerprint=theirs,
            max_keys_per_lookup=response.max_keys_per_lookup,
            lease_ttl_s=response.lease_ttl_ms / 1000,
            pull_port=response.pull_port,
        )

    def _dest_array(self, target: PullTarget) -> np.ndarray:
        """A uint8 array over ``target.dest`` (no copy), after checking its shape."""
        with memoryview(target.dest) as dest:
            if dest.readonly or dest.ndim != 1 or not dest.c_contiguous or dest.itemsize != 1:
                raise ValueError(
                    f"target {target.index}: dest must be a writable, contiguous 1-D byte view"
                )
            if dest.nbytes != self._chunk_bytes:
                raise ValueError(
                    f"target {target.index}: dest has {dest.nbytes} bytes, "
                    f"a row has {self._chunk_bytes}"
                )
        return np.frombuffer(target.dest, dtype=np.uint8)

    def _run_streams(
        self,
        lease_id: str,
        targets: Sequence[PullTarget],
        dests: list[np.ndarray],
        streams: int,
        timeout_s: float,
        cancel: threading.Event | None,
        job: PullJob,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        groups = [range(s, len(targets), streams) for s in range(streams)]

        def run(positions: range) -> None:
            self._stream(lease_id, targets, dests, positions, deadline, job)

        if streams == 1 and cancel is None:
            run(groups[0])
            return
        threads = [
            threading.Thread(target=run, args=(g,), name=f"kvpeer-pull-{n}", daemon=True)
            for n, g in enumerate(groups)
        ]
        for thread in threads:
            thread.start()
        if cancel is not None:
            while not job.finished.wait(_CANCEL_POLL_S):
                if cancel.is_set():
                    job.cancel("the pull was cancelled")
                    break
        for thread in threads:
            thread.join()

    def _stream(
        self,
        lease_id: str,
        targets: Sequence[PullTarget],
        dests: list[np.ndarray],
        positions: range,
        deadline: float,
        job: PullJob,
    ) -> None:
        """One Pull call for ``positions``; runs on its own thread (or the caller's).

        The same checks for both transports: each row must be one asked for and
        not sent before, under its key, of ``chunk_bytes``, and match its digest
        as written in ``dest``.
        """
        pending = {targets[p].index: p for p in positions}
        request = peer_pb2.PullRequest(lease_id=lease_id, indices=list(pending))
        call: RowStream | None = None
        try:
            call = self._start_pull(request.SerializeToString(), deadline)
            if not job.track(call):
                return
            for row in call:
                position = pending.pop(row.index, None)
                if position is None:
                    raise WireError(
                        f"peer sent row {row.index}, which was not asked for or sent twice"
                    )
                target, dest = targets[position], dests[position]
                if row.key != target.key:
                    call.skip()
                    job.fail(
                        f"row {row.index}: peer sent key {row.key.hex()}, "
                        f"expected {target.key.hex()}"
                    )
                    continue
                if row.data_len != dest.size:
                    raise WireError(
                        f"row {row.index} has {row.data_len} bytes, expected {dest.size}"
                    )
                call.read_into(dest)
                if digest(dest) != row.digest:
                    job.corrupt(
                        f"row {row.index}: digest mismatch, the row was corrupted "
                        "in transit; not loaded"
                    )
                    continue
                job.loaded(position, dest.size)
            if pending:
                job.fail(f"the peer ended the stream with {len(pending)} rows missing")
        except (grpc.RpcError, CallError) as exc:
            job.fail(_describe(exc))
        except WireError as exc:
            job.fail(f"bad frame: {exc}")
        except ValueError as exc:  # the channel was closed meanwhile
            job.fail(str(exc))
        except Exception as exc:  # a bug must not escape a stream thread unreported
            log.exception("pull stream from %s failed", self.endpoint)
            job.fail(f"{type(exc).__name__}: {exc}")
        finally:
            if call is not None:
                call.close()
            job.stream_done()

    def _start_pull(self, request: bytes, deadline: float) -> RowStream:
        if self._h2 is not None:
            return self._h2.start(request, deadline)
        rpc = self._pull_rpcs[next(self._next_channel) % len(self._pull_rpcs)]
        return GrpcRowStream(rpc(request, timeout=max(0.0, deadline - time.monotonic())))


def channel_options(chunk_bytes: int) -> list[tuple[str, Any]]:
    """gRPC channel options of a peer client: message limit, keepalive, flow control."""
    return [
        ("grpc.max_receive_message_length", chunk_bytes + MAX_HEADER_BYTES),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


def _check_transport(pull_transport: str) -> None:
    if pull_transport not in PULL_TRANSPORTS:
        raise ConfigError(
            "pull_transport", f"expected one of {list(PULL_TRANSPORTS)}, got {pull_transport!r}"
        )


def _unary(
    channel: grpc.Channel, method: str, request: type, response: type
) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        _SERVICE + method,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
        _registered_method=True,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def _translate(exc: grpc.RpcError, what: str) -> KVPeerError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = f"{what}: {_describe(exc)}"
    if code in _UNAVAILABLE:
        return PeerUnavailableError(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return IncompatiblePeerError(message)
    return KVPeerError(message)


class PeerClientPool:
    """One :class:`PeerClient` per endpoint, created on first use, shared by threads.

    The constructor takes what every client shares (the keywords of
    :class:`PeerClient`); :meth:`get` returns the client of an endpoint. Thread-safe.

    Raises:
        ConfigError: ``pull_transport`` is not one of :data:`PULL_TRANSPORTS`.
    """

    def __init__(
        self,
        *,
        node_id: str,
        fingerprint: Fingerprint,
        chunk_bytes: int,
        security: Security | None = None,
        rpc_timeout_s: float = 5.0,
        channels: int = 1,
        pull_transport: str = "h2",
        same_host: bool = True,
    ) -> None:
        _check_transport(pull_transport)
        self._kwargs = dict(
            same_host=same_host,
            node_id=node_id,
            fingerprint=fingerprint,
            chunk_bytes=chunk_bytes,
            security=security,
            rpc_timeout_s=rpc_timeout_s,
            channels=channels,
            pull_transport=pull_transport,
        )
        self._lock = threading.Lock()
        self._clients: dict[str, PeerClient] = {}
        self._closed = False

    def get(self, endpoint: str) -> PeerClient:
        """The client of ``endpoint`` (created now if new). Raises ConfigError for a bad one."""
        with self._lock:
            if self._closed:
                raise PeerUnavailableError("the peer client pool is closed")
            client = self._clients.get(endpoint)
            if client is None:
                client = PeerClient(endpoint, **self._kwargs)
                self._clients[endpoint] = client
            return client

    def set_fingerprint(self, fingerprint: Fingerprint) -> None:
        """Use ``fingerprint`` from now on: clients made with the old one are closed."""
        with self._lock:
            self._kwargs["fingerprint"] = fingerprint
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def close_all(self) -> None:
        """Close every client; later :meth:`get` calls raise PeerUnavailableError."""
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
