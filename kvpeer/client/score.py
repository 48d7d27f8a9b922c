"""Asking the directory how much of a request's prefix each node holds (Directory.Score).

:class:`ScoreClient` is for routers (``kvpeer proxy --route prefix``): one asyncio
gRPC channel, every call bounded by a short deadline, and every failure — directory
down, slow, refusing, or answering nonsense — raised as :class:`ScoreError` so the
caller can fall back without ever failing a request. It needs no registration
(routers are not nodes) and never imports torch or vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from kvpeer.api.limits import MAX_KEYS_PER_CALL
from kvpeer.api.security import Security
from kvpeer.client.replicas import FAILOVER_CODES, parse_directory_endpoints
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc

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
#: How long a replica that could not answer is asked only after the others.
_DOWN_S = 1.0


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
    """Directory.Score over one asyncio channel. Create, use and close on one event loop.

    Args:
        endpoint: the directory's ``host:port``, or several replicas on one Redis (a
            list or comma-separated): a call goes to the first that is not down; one
            that could not answer is down for a second (the next call asks another).
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
        self.targets = parse_directory_endpoints(endpoint)
        self.timeout_s = timeout_s
        self.fingerprint = fingerprint
        security = security or Security()
        self._metadata = security.call_metadata()
        self._channels = [security.open_aio_channel(t, _CHANNEL_OPTIONS) for t in self.targets]
        self._stubs = [directory_pb2_grpc.DirectoryStub(c) for c in self._channels]
        self._down_until = [0.0] * len(self.targets)

    async def score(self, keys: Sequence[bytes]) -> list[NodeScore]:
        """Every live node's longest prefix of ``keys`` (the first 4,096 count), longest first.

        Raises :class:`ScoreError` for anything but an answer; ValueError for no keys.
        """
        if not keys:
            raise ValueError("Score needs at least one key")
        request = pb.ScoreRequest(fingerprint=self.fingerprint, keys=keys[:MAX_KEYS_PER_CALL])
        deadline = time.monotonic() + self.timeout_s
        now = time.monotonic()
        order = sorted(range(len(self.targets)), key=lambda i: self._down_until[i] > now)
        error: ScoreError | None = None
        for index in order:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and error is not None:
                break
            try:
                response = await self._stubs[index].Score(
                    request, timeout=max(0.0005, remaining), metadata=self._metadata
                )
                break
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                error = ScoreError(
                    _REASONS.get(code, "refused"),
                    f"directory at {self.targets[index]}: {code.name}: {exc.details()}",
                )
                if code not in FAILOVER_CODES:
                    raise error from None
                self._down_until[index] = time.monotonic() + _DOWN_S
        else:
            assert error is not None
            raise error
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

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


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
