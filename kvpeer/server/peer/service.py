"""The KVPeer chunk server: Handshake, Lookup, Pull and Release over a :class:`ChunkSource`.

:class:`KVPeerServicer` implements the four methods of ``kvpeer.v1.KVPeer``
(``proto/kvpeer/v1/peer.proto``); :class:`PeerServer` runs it through
:class:`~kvpeer.server.grpc_server.GrpcServer`, which adds TLS, the bearer token,
health and reflection, and by default also runs
:class:`~kvpeer.transport.pull_server.PullServer` on a second port: Pull alone,
with zero-copy sends, advertised in the handshake (``pull_port``).

Two choices keep the data plane fast and the server robust:

- Pull answers with bytes framed by :mod:`kvpeer.api.wire` and an identity response
  serializer: each row goes from the pinned memoryview into the message in one
  copy, never through a protobuf object (on the pull port: in no copy at all).
- Requests arrive as raw bytes and are parsed here, so a malformed message gets
  INVALID_ARGUMENT naming the message instead of gRPC's generic INTERNAL.

Every refusal carries a status from the contract (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION) and a message naming the field or limit,
and is counted in :meth:`PeerServer.stats`.

The same-host fast path (MapRows, CheckLease) lives in :mod:`.same_host`; the
handshake says which host this node is on and which region it offers.

Why it is long: it is the one servicer of ``kvpeer.v1.KVPeer``; each handler is a
few lines over the lease table and the source, and the checks they share
(parse, authorise, refuse) are here once.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import WireError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.identity import AccessPolicy
from kvpeer.api.limits import MAX_KEY_BYTES, status_details
from kvpeer.api.same_host import this_host
from kvpeer.api.security import Security
from kvpeer.api.wire import MAX_HEADER_BYTES
from kvpeer.server.grpc_server import GrpcServer, Service
from kvpeer.server.peer import authz
from kvpeer.server.peer.chunk_source import ChunkSource, LookupRefused
from kvpeer.server.peer.leases import Lease, LeaseNotFound, LeaseTable, TooManyLeases
from kvpeer.server.peer.same_host import RowMapping, map_rows
from kvpeer.transport.pull_server import STATS_KEYS as PULL_STATS_KEYS
from kvpeer.transport.pull_server import PullServer, PullServerOptions
from kvpeer.transport.pull_stream import REVOKED_MESSAGE, PullStream, Refusal
from kvpeer.v1 import peer_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "kvpeer.v1.KVPeer"
_MAX_NODE_ID = 128
#: Floor of the response size limit: reflection answers are kilobytes even when rows are tiny.
_MIN_SEND_BYTES = 4 << 20

_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True)
class PeerServerOptions:
    """Limits and sizes of one peer server (see :class:`PeerServer`). Durations are seconds."""

    #: Most keys in one Lookup (INVALID_ARGUMENT beyond).
    max_keys_per_lookup: int = 4096
    #: How long a lease pins its chunks when nobody releases it.
    lease_ttl_s: float = 30.0
    #: Most live leases (RESOURCE_EXHAUSTED beyond).
    max_leases: int = 1024
    #: Cap of a Lookup's ``wait_ms``.
    max_lookup_wait_s: float = 10.0
    #: Longest the source may work out one Lookup's answer (beyond the wait).
    lookup_timeout_s: float = 5.0
    #: gRPC handler threads; each open Pull stream holds one while it sends.
    max_workers: int = 16
    #: Calls in progress or queued beyond this get RESOURCE_EXHAUSTED; None: 4 x workers.
    max_concurrent_rpcs: int | None = None


class KVPeerServicer:
    """The four KVPeer methods over one :class:`ChunkSource`.

    Handlers run on gRPC's handler threads, concurrently; the lease table and the
    source synchronise themselves, and counters are updated under ``_stats_lock``.
    ``node_id`` may be reassigned at any time (a str assignment is atomic).
    """

    def __init__(
        self,
        source: ChunkSource,
        *,
        node_id: str,
        fingerprint: Fingerprint,
        options: PeerServerOptions,
        access: AccessPolicy | None = None,
    ) -> None:
        self._access = access or AccessPolicy()  # who may call what: peer/authz.py
        self._source = source
        self.node_id = node_id
        self._fingerprint = fingerprint
        self._options = options
        self._leases = LeaseTable(options.lease_ttl_s, options.max_leases)
        self._streams_lock = threading.Lock()
        self._streams: set[PullStream | RowMapping] = set()
        #: Ports the handshake advertises; set by PeerServer once it is bound.
        self.listen_port = 0
        self.pull_port = 0
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    # -- RPC handlers ----------------------------------------------------------

    def handshake(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = self._parse(peer_pb2.HandshakeRequest, raw, context)
        self._authorize(context, "Handshake", request.node_id)
        self._count("handshakes")
        if request.HasField("fingerprint"):
            self._check_compatible(request, context)
        region = self._source.region()
        return peer_pb2.HandshakeResponse(
            protocol_version=PROTOCOL_VERSION,
            node_id=self.node_id,
            chunk_bytes=self._source.chunk_bytes,
            fingerprint=self._fingerprint.to_proto(),
            max_keys_per_lookup=self._options.max_keys_per_lookup,
            lease_ttl_ms=round(self._options.lease_ttl_s * 1000),
            pull_port=self.pull_port,
            listen_port=self.listen_port,
            host=this_host().to_proto(),
            region=region.to_proto() if region is not None else None,
        ).SerializeToString()

    def lookup(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = self._parse(peer_pb2.LookupRequest, raw, context)
        self._authorize(context, "Lookup")
        options = self._options
        if request.fingerprint != self._fingerprint.digest:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fingerprint {request.fingerprint[:64]!r} differs from this node's "
                f"{self._fingerprint.digest!r}: call Handshake to see which ingredient differs",
            )
        keys = list(request.keys)
        if not keys:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "keys: at least one key needed")
        if len(keys) > options.max_keys_per_lookup:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"keys: {len(keys)} keys exceed max_keys_per_lookup "
                f"({options.max_keys_per_lookup}); split the lookup",
            )
        for i, key in enumerate(keys):
            if not 0 < len(key) <= MAX_KEY_BYTES:
                self._abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"keys[{i}]: {len(key)} bytes, a key has 1 to {MAX_KEY_BYTES}",
                )
        if request.hold and self._leases.full():
            self._abort(context, *self._lease_limit())
        wait_s = min(request.wait_ms / 1000, options.max_lookup_wait_s)
        timeout_s = options.lookup_timeout_s + wait_s
        remaining = context.time_remaining()
        if remaining is not None:  # never work past the caller's deadline
            timeout_s = min(timeout_s, max(0.0, remaining))
        try:
            answer = self._source.lookup(
                keys,
                hold=request.hold,
                handoff_id=request.handoff_id,
                wait_s=min(wait_s, timeout_s),
                timeout_s=timeout_s,
            )
        except LookupRefused as exc:
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNAVAILABLE)
            self._abort(context, code, str(exc))
        hits = [bool(h) for h in answer.hits]
        response = peer_pb2.LookupResponse(hit=hits, lease_ttl_ms=round(self._leases.ttl_s * 1000))
        if request.hold and any(hits):
            try:
                lease = self._leases.add(keys, answer)
            except TooManyLeases:
                self._abort(context, *self._lease_limit())
            except LeaseNotFound as exc:
                self._abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
            response.lease_id = lease.lease_id
        else:
            answer.release()
        self._count("lookups")
        self._count("lookup_keys", len(keys))
        self._count("lookup_hits", sum(hits))
        return response.SerializeToString()

    def pull(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._authorize(context, "Pull")
        try:
            stream = self.open_pull(raw)
        except Refusal as refusal:
            context.abort(refusal.code, status_details(refusal.message))
        messages = _GrpcPullMessages(stream, context)
        if not context.add_callback(stream.close):
            stream.close()
        return messages

    def open_pull(self, raw: bytes) -> PullStream:
        """Validate a serialized PullRequest and start reading its lease (both listeners).

        The caller owns the returned stream and must :meth:`PullStream.close` it.

        Raises:
            Refusal: INVALID_ARGUMENT (malformed request, bad indices) or NOT_FOUND
                (unknown, released or expired lease); counted in the stats.
        """
        request = peer_pb2.PullRequest()
        try:
            request.ParseFromString(raw)
            lease = self._leases.begin_pull(request.lease_id)
        except DecodeError as exc:
            raise self._refusal(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed kvpeer.v1.PullRequest: {exc}"
            ) from None
        except LeaseNotFound as exc:
            raise self._refusal(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        try:
            indices = self._pull_indices(lease, list(request.indices))
        except Refusal as refusal:
            self._leases.end_pull(lease)
            raise self._refusal(refusal.code, refusal.message) from None
        self._count("pulls")
        stream = PullStream(lease, indices, self._end_pull, self._count)
        with self._streams_lock:
            self._streams.add(stream)
        return stream

    def release(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = self._parse(peer_pb2.ReleaseRequest, raw, context)
        self._authorize(context, "Release")
        try:
            self._leases.release(request.lease_id)
        except LeaseNotFound as exc:
            self._abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        return peer_pb2.ReleaseResponse().SerializeToString()

    def map_rows(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        """Same-host fast path: offsets and digests of a lease's pinned rows (see .same_host)."""
        request = self._parse(peer_pb2.MapRowsRequest, raw, context)
        self._authorize(context, "MapRows")
        try:
            lease = self._leases.begin_pull(request.lease_id)
        except LeaseNotFound as exc:
            self._abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        mapping = RowMapping(lease)
        with self._streams_lock:
            self._streams.add(mapping)
        try:
            indices = self._pull_indices(lease, list(request.indices))
            response = map_rows(self._source, mapping, indices, self._count)
        except Refusal as refusal:
            self._abort(context, refusal.code, refusal.message)
        finally:
            with self._streams_lock:
                self._streams.discard(mapping)
            self._leases.end_pull(lease)
        return response.SerializeToString()

    def check_lease(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        """OK while the lease is live; NOT_FOUND once released, expired or revoked."""
        request = self._parse(peer_pb2.CheckLeaseRequest, raw, context)
        self._authorize(context, "CheckLease")
        if not self._leases.is_live(request.lease_id):
            self._abort(context, grpc.StatusCode.NOT_FOUND, _lease_gone(request.lease_id))
        return peer_pb2.CheckLeaseResponse().SerializeToString()

    # -- for PeerServer --------------------------------------------------------

    @property
    def fingerprint(self) -> Fingerprint:
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: Fingerprint) -> None:
        self._fingerprint = value  # one atomic assignment; handlers read it once per call

    def revoke_leases(self) -> None:
        """End every lease now, cutting Pulls short.

        For a source that must take its rows back (vLLM's reset_cache): when this
        returns, no row of any lease is being read and every pin is released. A
        Pull in progress stops after the row it is framing and ends with
        UNAVAILABLE; its client counts only the rows it received whole.
        """
        pulled = self._leases.revoke_all()
        with self._streams_lock:
            streams = [s for s in self._streams if s.lease in pulled]
        for stream in streams:
            stream.revoke()

    def _end_pull(self, stream: PullStream) -> None:
        with self._streams_lock:
            self._streams.discard(stream)
        self._leases.end_pull(stream.lease)

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            counts = dict(self._counts)
        leases = self._leases.counters
        return {
            "handshakes": counts.get("handshakes", 0),
            "lookups": counts.get("lookups", 0),
            "lookup_keys": counts.get("lookup_keys", 0),
            "lookup_hits": counts.get("lookup_hits", 0),
            "pulls": counts.get("pulls", 0),
            "chunks_served": counts.get("chunks_served", 0),
            "bytes_served": counts.get("bytes_served", 0),
            "chunks_mapped": counts.get("chunks_mapped", 0),
            "bytes_mapped": counts.get("bytes_mapped", 0),
            "leases_live": len(self._leases),
            "leases_created": leases.created,
            "leases_released": leases.released,
            "leases_expired": leases.expired,
            "leases_revoked": leases.revoked,
            "errors_total": sum(v for k, v in counts.items() if k.startswith("errors_")),
            **{k: v for k, v in sorted(counts.items()) if k.startswith("errors_")},
        }

    def close(self) -> None:
        """Retire every lease (after the gRPC server stopped its calls)."""
        self._leases.close()

    # -- private -------------------------------------------------------------

    def _count(self, name: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += amount

    def _authorize(self, context: grpc.ServicerContext, method: str, node_id: str = "") -> None:
        """Abort the call if this caller may not make it (see :mod:`.authz`)."""
        if not self._access.enforcing:
            return
        code, detail = authz.refusal(self._access, context, method, node_id)
        if code is not None:
            self._abort(context, code, str(detail))

    def _abort(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        refusal = self._refusal(code, message)
        context.abort(refusal.code, status_details(refusal.message))
        raise AssertionError("unreachable: context.abort raises")

    def _refusal(self, code: grpc.StatusCode, message: str) -> Refusal:
        """A refusal, counted in the stats (``errors_<status>``)."""
        self._count(f"errors_{code.name.lower()}")
        log.debug("refusing %s: %s", code.name, message)
        return Refusal(code, message)

    def _parse(self, cls: type[_M], raw: bytes, context: grpc.ServicerContext) -> _M:
        message = cls()
        try:
            message.ParseFromString(raw)
        except DecodeError as exc:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"malformed {cls.DESCRIPTOR.full_name}: {exc}",
            )
        return message

    def _check_compatible(
        self, request: peer_pb2.HandshakeRequest, context: grpc.ServicerContext
    ) -> None:
        try:
            theirs = Fingerprint.from_proto(request.fingerprint)
        except WireError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"fingerprint: {exc}")
        node_id = request.node_id
        if len(node_id) > _MAX_NODE_ID or not node_id.isprintable():
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node_id: expected a printable name of at most {_MAX_NODE_ID} characters",
            )
        caller = repr(node_id) if node_id else "the caller"
        who = f"node {self.node_id!r} ('ours') refuses {caller} ('theirs')"
        if request.protocol_version != PROTOCOL_VERSION:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{who}: protocol_version differs (ours {PROTOCOL_VERSION}, "
                f"theirs {request.protocol_version}): upgrade all nodes to the same kvpeer release",
            )
        if request.chunk_bytes != self._source.chunk_bytes:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{who}: chunk_bytes differs (ours {self._source.chunk_bytes}, "
                f"theirs {request.chunk_bytes}): the chunk rows have different sizes "
                "(model, dtype, block size or layout)",
            )
        reason = self._fingerprint.mismatch(theirs)
        if reason is not None:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"{who}: {reason}")

    def _pull_indices(self, lease: Lease, requested: list[int]) -> list[int]:
        hits = lease.hits
        if not requested:
            return [i for i, hit in enumerate(hits) if hit]
        seen: set[int] = set()
        for position, index in enumerate(requested):
            if index in seen:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"indices[{position}]: {index} is named twice; ask for each row once",
                )
            seen.add(index)
            if index >= len(hits):
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"indices[{position}]: {index} is out of range, the lease has {len(hits)} keys",
                )
            if not hits[index]:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"indices[{position}]: key {index} did not hit, so the lease holds no row for it",
                )
        return requested

    def _lease_limit(self) -> tuple[grpc.StatusCode, str]:
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self._options.max_leases} leases are live on node {self.node_id!r}, "
            "its limit: retry later or release leases after pulling",
        )


def _lease_gone(lease_id: str) -> str:
    shown = lease_id if len(lease_id) <= 40 else lease_id[:40] + "..."
    return (
        f"lease {shown!r} is unknown, released, expired or revoked: the rows copied "
        "under it may have changed"
    )


class _GrpcPullMessages:
    """The response iterator of a Pull on grpcio: one ``bytes`` message per row.

    gRPC calls :meth:`__next__` on the stream's handler thread. Each row is copied
    once, into the message (grpcio's API takes ``bytes``), under the stream's lock.
    """

    def __init__(self, stream: PullStream, context: grpc.ServicerContext) -> None:
        self._stream = stream
        self._context = context

    def __iter__(self) -> _GrpcPullMessages:
        return self

    def __next__(self) -> bytes:
        stream = self._stream
        with stream.lock:
            if stream.revoked:
                self._context.abort(grpc.StatusCode.UNAVAILABLE, REVOKED_MESSAGE)
            item = stream.next_row() if self._context.is_active() else None
            if item is None:
                stream.close_locked()
                raise StopIteration
            header, row = item
            message = b"".join((header, row))
        stream.count_row(len(row))
        return message


class PeerServer:
    """A running KVPeer service (plus health and reflection) over one chunk source.

    Use as a context manager, or :meth:`start` then :meth:`stop`. Stopping ends the
    calls in progress (after ``grace`` seconds), then releases every lease, so the
    source ends with no pins held by this server.

    Args:
        source: where the rows come from.
        node_id: this node's name, sent in handshakes; may be set again after
            :meth:`start` (a node that learns its advertised address from the port).
        fingerprint: this node's compatibility fingerprint.
        listen: ``host:port`` to bind; port 0 picks a free port.
        security: TLS and token; plaintext and open by default.
        pull_port: port of the fast Pull listener on ``listen``'s host (0: a free
            one), or None for none (Pull is then served on ``listen`` only).
        pull_options: the fast Pull listener's limits and timeouts.
        The remaining keywords are the fields of :class:`PeerServerOptions`.

    Raises:
        ConfigError: (from :meth:`start`) ``listen`` or ``pull_port`` cannot be bound.
    """

    def __init__(
        self,
        source: ChunkSource,
        *,
        node_id: str,
        fingerprint: Fingerprint,
        listen: str | Endpoint = "127.0.0.1:0",
        security: Security | None = None,
        max_keys_per_lookup: int = 4096,
        lease_ttl_s: float = 30.0,
        max_leases: int = 1024,
        max_lookup_wait_s: float = 10.0,
        lookup_timeout_s: float = 5.0,
        max_workers: int = 16,
        max_concurrent_rpcs: int | None = None,
        pull_port: int | None = 0,
        pull_options: PullServerOptions | None = None,
    ) -> None:
        self.options = PeerServerOptions(
            max_keys_per_lookup=max_keys_per_lookup,
            lease_ttl_s=lease_ttl_s,
            max_leases=max_leases,
            max_lookup_wait_s=max_lookup_wait_s,
            lookup_timeout_s=lookup_timeout_s,
            max_workers=max_workers,
            max_concurrent_rpcs=max_concurrent_rpcs,
        )
        self.servicer = KVPeerServicer(
            source,
            node_id=node_id,
            fingerprint=fingerprint,
            options=self.options,
            access=(security or Security()).access,
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Handshake": grpc.unary_unary_rpc_method_handler(self.servicer.handshake),
                "Lookup": grpc.unary_unary_rpc_method_handler(self.servicer.lookup),
                "Pull": grpc.unary_stream_rpc_method_handler(self.servicer.pull),
                "Release": grpc.unary_unary_rpc_method_handler(self.servicer.release),
                "MapRows": grpc.unary_unary_rpc_method_handler(self.servicer.map_rows),
                "CheckLease": grpc.unary_unary_rpc_method_handler(self.servicer.check_lease),
            },
        )
        self._grpc = GrpcServer(
            listen,
            [Service(SERVICE_NAME, handler)],
            security,
            max_workers=max_workers,
            max_concurrent_rpcs=max_concurrent_rpcs or 4 * max_workers,
            max_send_bytes=max(source.chunk_bytes + MAX_HEADER_BYTES, _MIN_SEND_BYTES),
        )
        self._pull: PullServer | None = None
        if pull_port is not None:
            self._pull = PullServer(
                self.servicer.open_pull,
                self._grpc.endpoint.with_port(pull_port),
                security or Security(),
                pull_options or PullServerOptions(),
            )

    @property
    def node_id(self) -> str:
        return self.servicer.node_id

    @node_id.setter
    def node_id(self, value: str) -> None:
        self.servicer.node_id = value

    @property
    def port(self) -> int:
        return self._grpc.port

    @property
    def endpoint(self) -> Endpoint:
        return self._grpc.endpoint

    @property
    def pull_port(self) -> int:
        """The fast Pull listener's port once started; 0 when there is none."""
        return self._pull.port if self._pull is not None else 0

    def start(self) -> PeerServer:
        self._grpc.start()
        if self._pull is not None:
            try:
                self._pull.start()
            except BaseException:
                self._grpc.stop(0)
                raise
        self.servicer.listen_port = self._grpc.port
        self.servicer.pull_port = self.pull_port
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (calls get ``grace`` seconds, on both ports at once); idempotent."""
        if self._pull is not None:
            self._pull.shutdown(grace or 0.0)
        self._grpc.stop(grace)
        if self._pull is not None:
            self._pull.stop(grace or 0.0)
        self.servicer.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._grpc.wait(timeout)

    @property
    def fingerprint(self) -> Fingerprint:
        return self.servicer.fingerprint

    @fingerprint.setter
    def fingerprint(self, value: Fingerprint) -> None:
        """Adopt a new fingerprint (a vLLM node learns its hash seed after start-up)."""
        self.servicer.fingerprint = value

    def revoke_leases(self) -> None:
        """End every lease and the Pulls reading them (see KVPeerServicer.revoke_leases)."""
        self.servicer.revoke_leases()

    def stats(self) -> dict[str, int]:
        """Counters since start: calls, chunks and bytes served, leases, errors by status.

        Keys: handshakes, lookups, lookup_keys, lookup_hits, pulls, chunks_served,
        bytes_served, chunks_mapped, bytes_mapped (same-host MapRows), leases_live, leases_created, leases_released, leases_expired,
        errors_total and one ``errors_<status>`` (e.g. ``errors_not_found``) per
        status answered so far (both ports); and of the pull port:
        pull_port_connections (open now), pull_port_calls,
        pull_port_refused_connections (closed at accept, over the limit).
        """
        pull = self._pull.stats() if self._pull is not None else dict.fromkeys(PULL_STATS_KEYS, 0)
        return self.servicer.stats() | pull

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
