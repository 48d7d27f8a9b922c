"""The Directory gRPC service: validation, status codes and metrics around a :class:`DirectoryStore`.

Score (for routers) answers, for a request's chunk keys in order, each live node's
longest held prefix and last reported load; it refuses an empty list or keys of
different lengths (INVALID_ARGUMENT) and more than 4,096 keys (RESOURCE_EXHAUSTED).

:class:`DirectoryServicer` checks every request (sizes, digests, node ids,
endpoints), calls the store and maps the store's refusals to gRPC statuses:

=============================  ======================================================
not this caller's node id      PERMISSION_DENIED (naming the caller and the node id; authz.py)
unknown node                   NOT_FOUND ("unknown node a: ...: re-join")
stale epoch                    FAILED_PRECONDITION ("stale epoch 3 for node a (current 4): re-join")
malformed request              INVALID_ARGUMENT, naming the field
more than 4,096 keys           RESOURCE_EXHAUSTED
store unreachable (Redis)      UNAVAILABLE ("redis at host:port unreachable: ...")
=============================  ======================================================

:class:`DirectoryServer` runs the servicer through :class:`GrpcServer` (TLS,
token, health, reflection), a sweeper thread that ends expired leases and frees
fenced entries, and optionally Prometheus ``/metrics`` on its own HTTP port.

Server time: every handler's time from the parsed request to the built response
(store call included, (de)serialisation excluded) is observed in the histogram
``kvpeer_directory_request_seconds{method}``; the benchmark reads it from there.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvpeer import DEFAULT_DIRECTORY_PORT
from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError, WireError
from kvpeer.api.fingerprint import Fingerprint, is_digest
from kvpeer.api.limits import MAX_KEYS_PER_CALL, status_details
from kvpeer.api.security import Security
from kvpeer.server.directory.authz import Denied, DirectoryAuthz, NamespaceAllowList
from kvpeer.server.directory.memory_store import MemoryStore
from kvpeer.server.directory.scoring import score_response
from kvpeer.server.directory.store import (
    MAX_NODE_ID_CHARS,
    DirectoryStore,
    NodeLoad,
    StaleEpochError,
    StoreError,
    StoreUnavailableError,
    TooManyKeysError,
    UnknownNodeError,
    check_keys,
)
from kvpeer.server.grpc_server import GrpcServer, Service
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "kvpeer.v1.Directory"
#: Shortest and longest lease a directory hands out (the wire field is uint32 ms).
MIN_LEASE_TTL_S = 0.2
MAX_LEASE_TTL_S = 3600.0
#: Upper bounds of the request-time histogram, in seconds.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0)


class _Refused(Exception):
    """A request the servicer turns down before reaching the store."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_of(exc: StoreError) -> grpc.StatusCode:
    if isinstance(exc, UnknownNodeError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, StaleEpochError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, StoreUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, TooManyKeysError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def _check_node(node_id: str, epoch: int | None = None) -> None:
    if not node_id:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "node_id is empty")
    if len(node_id) > MAX_NODE_ID_CHARS or not node_id.isprintable() or " " in node_id:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"node_id {node_id[:MAX_NODE_ID_CHARS]!r} is not 1 to {MAX_NODE_ID_CHARS} "
            "printable characters without spaces",
        )
    if epoch is not None and epoch == 0:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"epoch is 0 for node {node_id}: join first"
        )


def _check_digest(field: str, value: str, *, optional: bool = False) -> None:
    if optional and not value:
        return
    if not is_digest(value):
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} {value[:80]!r} is not a fingerprint digest (32 lower-case hex digits)",
        )


def _check_batch(keys: Sequence[bytes], *, one_length: bool = False) -> None:
    problem = check_keys(keys, one_length=one_length)
    if problem is not None:
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if len(keys) > MAX_KEYS_PER_CALL
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        raise _Refused(code, problem)


class DirectoryMetrics:
    """The directory's Prometheus metrics, in a registry of its own (tests run several)."""

    def __init__(self, store: DirectoryStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvpeer_directory_requests",
            "Directory RPCs by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.seconds = Histogram(
            "kvpeer_directory_request_seconds",
            "Server time of directory RPCs: parsed request to built response.",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.keys = Counter(
            "kvpeer_directory_request_keys",
            "Keys carried by Publish, Withdraw and Locate requests.",
            ("method",),
            registry=self.registry,
        )
        self.located = Counter(
            "kvpeer_directory_located_keys",
            "Keys a Locate found at least one holder for.",
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(store))


class _StoreCollector(Collector):
    """Node and entry gauges per fingerprint, read from the store at scrape time."""

    def __init__(self, store: DirectoryStore) -> None:
        self._store = store

    def describe(self) -> list[Any]:
        return []  # do not call the store when registering

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("kvpeer_directory_store_up", "1 when the store answered.")
        nodes = GaugeMetricFamily(
            "kvpeer_directory_nodes", "Live nodes per fingerprint.", labels=("fingerprint",)
        )
        keys = GaugeMetricFamily(
            "kvpeer_directory_keys",
            "Entries (key, node) of live nodes per fingerprint.",
            labels=("fingerprint",),
        )
        try:
            stats = self._store.stats()
        except StoreError as exc:
            log.warning("metrics: store unavailable: %s", exc)
            up.add_metric((), 0)
            yield up
            return
        up.add_metric((), 1)
        for ns in stats:
            nodes.add_metric((ns.fingerprint,), ns.nodes)
            keys.add_metric((ns.fingerprint,), ns.keys)
        yield from (up, nodes, keys)


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _rpc(method: _Handler) -> _Handler:
    """Wrap a servicer method: time it, count its outcome, map refusals to statuses.

    Requests that did not parse are answered INVALID_ARGUMENT (see :func:`_lenient_parser`).
    Unexpected exceptions are logged and answered INTERNAL; the server keeps running.
    """
    name = method.__name__

    @functools.wraps(method)
    def handler(self: DirectoryServicer, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        try:
            if isinstance(request, _Malformed):
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            self.authz.admit(name, request, context)  # identity, role, namespace (authz.py)
            return method(self, request, context)
        except (_Refused, Denied) as exc:
            code, message = exc.code, exc.message
        except StoreError as exc:
            code, message = _status_of(exc), str(exc)
        except Exception:
            log.exception("directory %s failed", name)
            code, message = grpc.StatusCode.INTERNAL, f"{name} failed: see the directory's log"
        finally:
            self.metrics.seconds.labels(name).observe(time.perf_counter() - start)
            self.metrics.requests.labels(name, code.name).inc()
        context.abort(code, status_details(message))

    return handler  # type: ignore[return-value]


class _EncodedRows(dict):
    """Row of holder indices -> its encoding as one ``LocateResponse.holders`` entry.

    Protobuf encodings concatenate: the bytes of ``LocateResponse(holders=[a])``
    followed by those of ``LocateResponse(holders=[b])`` parse as
    ``LocateResponse(holders=[a, b])``. A Locate has few distinct rows (``()``,
    ``(0,)``, ``(0, 1)``...), so encoding each once and joining bytes is several
    times faster than building a KeyHolders message per key.
    """

    def __missing__(self, row: tuple[int, ...]) -> bytes:
        encoded = self[row] = pb.LocateResponse(
            holders=[pb.KeyHolders(nodes=row)]
        ).SerializeToString()
        return encoded


class DirectoryServicer(directory_pb2_grpc.DirectoryServicer):
    """The Directory service over a store.

    Called from gRPC handler threads, concurrently; it keeps no state of its own
    besides metrics (thread-safe), so all consistency comes from the store.
    """

    def __init__(
        self,
        store: DirectoryStore,
        lease_ttl_s: float,
        metrics: DirectoryMetrics,
        authz: DirectoryAuthz | None = None,
    ):
        self.store = store
        self.authz = authz or DirectoryAuthz()
        self.lease_ttl_s = lease_ttl_s
        self._lease_ms = round(lease_ttl_s * 1000)
        self.metrics = metrics

    @_rpc
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        _check_node(request.node_id)
        if not request.endpoint:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "endpoint is empty")
        try:
            endpoint = parse_endpoint(request.endpoint, key="endpoint")
        except ConfigError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if endpoint.is_wildcard:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"endpoint {request.endpoint!r} binds every interface; peers cannot dial it: "
                "advertise a routable host",
            )
        if not request.HasField("fingerprint"):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "fingerprint is missing")
        try:
            fingerprint = Fingerprint.from_proto(request.fingerprint)
        except WireError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        epoch = self.store.join(request.node_id, str(endpoint), fingerprint, self.lease_ttl_s)
        log.info(
            "join %s at %s epoch %d (%s)", request.node_id, endpoint, epoch, fingerprint.digest
        )
        return pb.JoinResponse(
            epoch=epoch, lease_ttl_ms=self._lease_ms, store_id=self.store.store_id
        )

    @_rpc
    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        _check_node(request.node_id, request.epoch)
        load = None
        if request.HasField("load"):
            load = NodeLoad(
                request.load.pinned_rows, request.load.running_requests, request.load.peer_leases
            )
        self.store.heartbeat(request.node_id, request.epoch, self.lease_ttl_s, load)
        return pb.HeartbeatResponse(lease_ttl_ms=self._lease_ms)

    @_rpc
    def Publish(
        self, request: pb.PublishRequest, context: grpc.ServicerContext
    ) -> pb.PublishResponse:
        _check_node(request.node_id, request.epoch)
        _check_batch(request.keys)
        accepted = self.store.publish(request.node_id, request.epoch, request.keys)
        self.metrics.keys.labels("Publish").inc(len(request.keys))
        return pb.PublishResponse(accepted=accepted)

    @_rpc
    def Withdraw(
        self, request: pb.WithdrawRequest, context: grpc.ServicerContext
    ) -> pb.WithdrawResponse:
        _check_node(request.node_id, request.epoch)
        _check_batch(request.keys)
        removed = self.store.withdraw(request.node_id, request.epoch, request.keys)
        self.metrics.keys.labels("Withdraw").inc(len(request.keys))
        return pb.WithdrawResponse(removed=removed)

    @_rpc
    def Locate(self, request: pb.LocateRequest, context: grpc.ServicerContext) -> pb.LocateResponse:
        _check_digest("fingerprint", request.fingerprint)
        _check_batch(request.keys)
        located = self.store.locate(request.fingerprint, request.keys, request.exclude_node_id)
        nodes = pb.LocateResponse(
            nodes=[
                pb.NodeRef(node_id=n.node_id, endpoint=n.endpoint, epoch=n.epoch)
                for n in located.nodes
            ],
            store_id=self.store.store_id,
        )
        encoded = _EncodedRows()
        response = pb.LocateResponse.FromString(
            nodes.SerializeToString() + b"".join(map(encoded.__getitem__, located.holders))
        )
        self.metrics.keys.labels("Locate").inc(len(request.keys))
        self.metrics.located.inc(len(located.holders) - located.holders.count(()))
        return response

    @_rpc
    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        _check_digest("fingerprint", request.fingerprint, optional=True)
        keys = list(request.keys)  # each read of request.keys makes new bytes objects
        _check_batch(keys, one_length=True)
        scored = self.store.score(request.fingerprint or None, keys)
        caller = self.authz.principal(context)  # namespaces it may see, epochs it may use
        scored = [n for n in scored if self.authz.sees_namespace(caller, n.fingerprint)]
        self.metrics.keys.labels("Score").inc(len(keys))
        response = score_response(scored, lambda node_id: self.authz.sees_epoch(caller, node_id))
        response.store_id = self.store.store_id
        return response

    @_rpc
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        _check_node(request.node_id, request.epoch)
        self.store.leave(request.node_id, request.epoch)
        log.info("leave %s epoch %d", request.node_id, request.epoch)
        return pb.LeaveResponse()

    @_rpc
    def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.ServicerContext
    ) -> pb.ListNodesResponse:
        _check_digest("fingerprint", request.fingerprint, optional=True)
        records = self.store.list_nodes(request.fingerprint or None)
        caller = self.authz.principal(context)  # epochs only for nodes the caller may act as
        records = [r for r in records if self.authz.sees_namespace(caller, r.fingerprint.digest)]
        return pb.ListNodesResponse(
            nodes=[
                pb.NodeInfo(
                    node_id=r.node_id,
                    endpoint=r.endpoint,
                    epoch=r.epoch if self.authz.sees_epoch(caller, r.node_id) else 0,
                    fingerprint=r.fingerprint.to_proto(),
                    keys=r.keys,
                    lease_remaining_ms=max(0, round(r.lease_remaining_s * 1000)),
                )
                for r in records
            ]
        )

    @_rpc
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        namespaces = self.store.stats()
        return pb.StatsResponse(
            nodes=sum(ns.nodes for ns in namespaces),
            keys=sum(ns.keys for ns in namespaces),
            fingerprints=[
                pb.FingerprintStats(fingerprint=ns.fingerprint, nodes=ns.nodes, keys=ns.keys)
                for ns in namespaces
            ],
            store=self.store.name,
            store_id=self.store.store_id,
        )


class _Malformed:
    """What a handler receives instead of a request whose bytes do not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient_parser(cls: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    """A request deserializer that never raises.

    gRPC answers an exception in a deserializer with INTERNAL ("Exception
    deserializing request!"), which tells the caller nothing and reads like a
    server bug; :func:`_rpc` answers a :class:`_Malformed` with INVALID_ARGUMENT
    naming the message instead.
    """

    def parse(raw: bytes) -> Message | _Malformed:
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return _Malformed(f"malformed {cls.DESCRIPTOR.full_name}: {exc}")

    return parse


def directory_service(servicer: DirectoryServicer) -> Service:
    """The servicer as a :class:`Service` for :class:`GrpcServer`, one handler per proto method."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in pb.DESCRIPTOR.services_by_name["Directory"].methods
    }
    return Service(SERVICE_NAME, grpc.method_handlers_generic_handler(SERVICE_NAME, handlers))


def check_lease_ttl(ttl_s: float, key: str = "lease_ttl") -> float:
    """``ttl_s`` if it is a lease the directory can hand out; else ConfigError naming ``key``."""
    if not MIN_LEASE_TTL_S <= ttl_s <= MAX_LEASE_TTL_S:
        raise ConfigError(
            key, f"{ttl_s} s is out of range: use {MIN_LEASE_TTL_S} to {MAX_LEASE_TTL_S:.0f} s"
        )
    return ttl_s


class DirectoryServer:
    """A running directory: gRPC service, sweeper thread and optional ``/metrics``.

    The server owns the store: :meth:`stop` closes it. Use as a context manager, or
    :meth:`start` then :meth:`stop` (idempotent).

    Args:
        listen: ``host:port`` for gRPC; port 0 picks a free port (see :attr:`port`).
        store: the state; a fresh :class:`MemoryStore` by default.
        lease_ttl_s: lease handed to joining nodes; they heartbeat well within it.
        security: TLS / bearer token for the gRPC port.
        metrics_listen: ``host:port`` for Prometheus ``/metrics`` (port 0: free
            port, see :attr:`metrics_port`); None serves no metrics.
        sweep_interval_s: how often expired leases are ended and fenced entries
            freed; default a quarter of the lease, at most 1 s.
        max_workers, max_concurrent_rpcs: handler threads, and the calls in
            progress or queued beyond which callers get RESOURCE_EXHAUSTED.
        listen_key: the name errors about ``listen`` use (the CLI says ``--listen``).
        namespace_allow: fingerprints served only to the identities listed
            (:class:`~kvpeer.server.directory.authz.NamespaceAllowList`); who
            callers are comes from ``security.access`` (see ``authz.py``).
    """

    def __init__(
        self,
        listen: str | Endpoint = f"0.0.0.0:{DEFAULT_DIRECTORY_PORT}",
        *,
        store: DirectoryStore | None = None,
        lease_ttl_s: float = 10.0,
        security: Security | None = None,
        metrics_listen: str | None = None,
        sweep_interval_s: float | None = None,
        max_workers: int = 16,
        max_concurrent_rpcs: int = 256,
        listen_key: str = "listen",
        namespace_allow: NamespaceAllowList | None = None,
    ) -> None:
        self.store = store if store is not None else MemoryStore()
        self.lease_ttl_s = check_lease_ttl(lease_ttl_s)
        self.metrics = DirectoryMetrics(self.store)
        self.servicer = DirectoryServicer(
            self.store,
            lease_ttl_s,
            self.metrics,
            DirectoryAuthz((security or Security()).access, namespace_allow),
        )
        self._grpc = GrpcServer(
            listen,
            [directory_service(self.servicer)],
            security,
            max_workers=max_workers,
            max_concurrent_rpcs=max_concurrent_rpcs,
            listen_key=listen_key,
        )
        self._metrics_endpoint = (
            None
            if metrics_listen is None
            else parse_endpoint(metrics_listen, key="metrics_listen", allow_port_zero=True)
        )
        self._metrics_http: Any = None
        self.metrics_port: int | None = None
        self._sweep_interval = sweep_interval_s or min(1.0, lease_ttl_s / 4)
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._grpc.port

    @property
    def endpoint(self) -> Endpoint:
        return self._grpc.endpoint

    def start(self) -> DirectoryServer:
        self._grpc.start()
        try:
            if self._metrics_endpoint is not None:
                host, port = self._metrics_endpoint
                try:
                    httpd, _thread = start_http_server(port, host, registry=self.metrics.registry)
                except OSError as exc:
                    raise ConfigError(
                        "metrics_listen", f"cannot bind {self._metrics_endpoint}: {exc}"
                    ) from exc
                self._metrics_http = httpd
                self.metrics_port = httpd.server_address[1]
        except BaseException:
            self._grpc.stop(grace=None)
            raise
        self._sweeper = threading.Thread(
            target=self._sweep_loop, name="kvpeer-directory-sweeper", daemon=True
        )
        self._sweeper.start()
        log.info(
            "directory on %s, store %s, lease %.1f s%s",
            self.endpoint,
            self.store.name,
            self.lease_ttl_s,
            f", metrics on :{self.metrics_port}" if self.metrics_port else "",
        )
        return self

    def _sweep_loop(self) -> None:
        """Sweeper thread: call store.sweep() until it has nothing left, then wait."""
        failing = False
        while not self._stopping.wait(self._sweep_interval):
            try:
                while self.store.sweep() and not self._stopping.is_set():
                    pass
            except StoreError as exc:
                if not failing:
                    log.warning("sweeper: %s", exc)
                failing = True
            except Exception:
                log.exception("sweeper failed; retrying")
            else:
                if failing:
                    log.info("sweeper: store reachable again")
                failing = False

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving, stop the sweeper and /metrics, close the store. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._grpc.stop(grace)
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.store.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._grpc.wait(timeout)

    def __enter__(self) -> DirectoryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
