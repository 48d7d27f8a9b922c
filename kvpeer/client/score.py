"""Asking the directory how much of a request's prefix each node holds (Directory.Score).

:class:`ScoreClient` is for routers (``kvpeer proxy --route prefix``): an asyncio gRPC
channel per directory replica, every call bounded by a short deadline, and every
failure — directory down, slow, refusing, or answering nonsense — raised as
:class:`ScoreError` so the caller can fall back without ever failing a request. It
needs no registration (routers are not nodes) and never imports torch or vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from kvpeer.api.limits import MAX_KEYS_PER_CALL
from kvpeer.api.security import Security
from kvpeer.client.replicas import DirectoryReplicas, status_code, status_details
from kvpeer.v1 import directory_pb2 as pb

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 16 << 20),
]


_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.UNIMPLEMENTED: "unimplemented",
}
#: Deadline of a probe of a replica that could not answer (off the request path).
_PROBE_TIMEOUT_S = 1.0


class ScoreError(Exception):
    """The directory could not be asked (``reason``: ``timeout``, ``unavailable``, ``refused``...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NodeScore:
    """One live node's answer: its held prefix and (when it reported one) its load."""

    node_id: str
    endpoint: str
    fingerprint: str
    prefix_keys: int
    running_requests: int | None = None
    pinned_rows: int | None = None
    peer_leases: int | None = None
    load_age_s: float | None = None


class ScoreClient:
    """Directory.Score over asyncio channels. Create, use and close on one event loop.

    Args:
        endpoint: the directory's ``host:port``, or several replicas on one Redis (a
            list or comma-separated): calls rotate over the healthy ones and fail
            over within the deadline; one that could not answer is asked last until
            a probe (a task on the caller's loop) finds it back, and one that serves
            another store than most of them is not asked at all
            (:class:`~kvpeer.client.replicas.DirectoryReplicas`).
        timeout_s: deadline of each call (routing must stay cheap: a few ms).
        fingerprint: score only this namespace (digest); empty scores every one.
        security: the TLS files and/or bearer token the directory requires (a
            router is a read-only caller: a reader certificate or token will do).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        timeout_s: float = 0.005,
        fingerprint: str = "",
        security: Security | None = None,
    ) -> None:
        self._replicas = DirectoryReplicas(endpoint, security, _CHANNEL_OPTIONS, aio=True)
        self.targets = self._replicas.targets
        self.timeout_s = timeout_s
        self.fingerprint = fingerprint
        self._probing: asyncio.Task[None] | None = None

    async def score(self, keys: Sequence[bytes]) -> list[NodeScore]:
        """Every live node's longest prefix of ``keys`` (the first 4,096 count), longest first.

        Raises :class:`ScoreError` for anything but an answer; ValueError for no keys.
        """
        if not keys:
            raise ValueError("Score needs at least one key")
        request = pb.ScoreRequest(fingerprint=self.fingerprint, keys=keys[:MAX_KEYS_PER_CALL])
        self._probe_recovering()
        try:
            response = await self._replicas.call_async(
                "Score", request, deadline=time.monotonic() + self.timeout_s
            )
        except grpc.RpcError as exc:
            code = status_code(exc)
            reason = "refused" if code is None else _REASONS.get(code, "refused")
            name = "no answer" if code is None else code.name
            raise ScoreError(
                reason,
                f"directory at {', '.join(self.targets)}: {name}: {status_details(exc)}",
            ) from None
        out = []
        for node in response.nodes:
            has_load = node.HasField("load")
            out.append(
                NodeScore(
                    node.node_id,
                    node.endpoint,
                    node.fingerprint,
                    min(node.prefix_keys, len(request.keys)),
                    node.load.running_requests if has_load else None,
                    node.load.pinned_rows if has_load else None,
                    node.load.peer_leases if has_load else None,
                    node.load_age_ms / 1000 if has_load else None,
                )
            )
        return out

    def replica_health(self) -> dict[str, dict[str, object]]:
        """Per directory replica: up, calls, failures, last error, split."""
        return self._replicas.health()

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        await self._replicas.close_async()

    def _probe_recovering(self) -> None:
        """Start a probe of the replicas due one, unless one runs: never on the call's path."""
        if self._replicas.recovering() and (self._probing is None or self._probing.done()):
            self._probing = asyncio.ensure_future(self._replicas.probe_async(_PROBE_TIMEOUT_S))


def load_message(load: Callable[[], Mapping[str, int]] | None) -> pb.NodeLoad | None:
    """A heartbeat's NodeLoad from a node's load callable (None: send none).

    ``load()`` returns ``pinned_rows``, ``running_requests`` and/or ``peer_leases``
    (missing ones are 0). It must never stop a heartbeat: if it raises, none is sent.
    """
    if load is None:
        return None
    try:
        figures = load()
        return pb.NodeLoad(
            pinned_rows=int(figures.get("pinned_rows", 0)),
            running_requests=int(figures.get("running_requests", 0)),
            peer_leases=int(figures.get("peer_leases", 0)),
        )
    except Exception:
        log.debug("load figures failed", exc_info=True)
        return None
