"""One way to run a kvpeer gRPC server: TLS, bearer token, health, reflection, limits.

Both the peer chunk server and the directory run through :class:`GrpcServer`, so
they behave the same for operators: ``grpcurl`` lists and describes every service
through reflection, ``grpc.health.v1.Health`` answers per service, requests are
size-bounded and the number of concurrent calls is capped (excess calls get
RESOURCE_EXHAUSTED instead of queueing without bound).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.limits import MAX_REQUEST_BYTES
from kvpeer.api.security import Security

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Service:
    """A service to serve: its full proto name and its generic handler."""

    name: str
    handler: grpc.GenericRpcHandler


class GrpcServer:
    """A started gRPC server. Create, then :meth:`start`; :meth:`stop` is idempotent.

    Args:
        listen: ``host:port`` to bind; port 0 picks a free port (see :attr:`port`).
        services: the application services; health and reflection are added.
        security: TLS / token; plaintext and open by default.
        max_workers: handler threads. Streams hold a thread while they send.
        max_concurrent_rpcs: calls beyond this get RESOURCE_EXHAUSTED.
        max_send_bytes: largest response message (a chunk row plus its header).
    """

    def __init__(
        self,
        listen: str | Endpoint,
        services: Sequence[Service],
        security: Security | None = None,
        *,
        max_workers: int = 16,
        max_concurrent_rpcs: int | None = None,
        max_send_bytes: int = 64 << 20,
        listen_key: str = "listen",
    ) -> None:
        self._endpoint = (
            listen
            if isinstance(listen, Endpoint)
            else parse_endpoint(listen, key=listen_key, allow_port_zero=True)
        )
        self._listen_key = listen_key
        self._security = security or Security()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.so_reuseport", 0),
            # Notice dead clients (e.g. SIGKILLed consumers holding a stream) quickly.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._executor = futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"kvpeer-grpc-{self._endpoint.port}"
        )
        self._server = grpc.server(
            self._executor,
            interceptors=self._security.server_interceptors(),
            options=options,
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for service in services:
            self._server.add_generic_rpc_handlers((service.handler,))
        names = [s.name for s in services]
        reflection.enable_server_reflection(
            (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._service_names = names
        self.port: int = 0
        self._started = False
        self._stopped = False

    @property
    def endpoint(self) -> Endpoint:
        """The bound endpoint (with the real port once started)."""
        return self._endpoint.with_port(self.port or self._endpoint.port)

    def start(self) -> GrpcServer:
        address = str(self._endpoint)
        creds = self._security.server_credentials()
        try:
            if creds is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, creds)
        except RuntimeError as exc:
            raise ConfigError(self._listen_key, f"cannot bind {address}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(self._listen_key, f"cannot bind {address}: address in use or invalid")
        self._server.start()
        self._started = True
        for name in ("", *self._service_names):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", ", ".join(self._service_names), self.endpoint)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, give running calls ``grace`` seconds, then cancel them."""
        if self._stopped:
            return
        self._stopped = True
        self._health.enter_graceful_shutdown()
        if self._started:
            self._server.stop(grace).wait()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (e.g. from a signal handler); True if it did."""
        return self._server.wait_for_termination(timeout)
