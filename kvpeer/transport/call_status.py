"""How a client call ends, named as grpc names it: :class:`CallError` and its mappings.

:class:`~kvpeer.transport.connection.H2Connection` reads HTTP/2 and gRPC signals
(a response's HTTP status and content-type, its trailers' ``grpc-status`` and
``grpc-message``, an RST_STREAM's error code); this module turns each into the
status name grpc's own clients would report, as gRPC's "HTTP to gRPC status code
mapping" asks, so a caller handles kvpeer's pull path and grpcio alike.
"""

from __future__ import annotations

import grpc

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import KVPeerError, WireError
from kvpeer.transport import frames as h2

#: How grpc maps an RST_STREAM error code to a status (others are INTERNAL).
RESET_STATUS = {
    h2.REFUSED_STREAM: "UNAVAILABLE",
    h2.CANCEL: "CANCELLED",
    h2.ENHANCE_YOUR_CALM: "RESOURCE_EXHAUSTED",
    12: "PERMISSION_DENIED",  # INADEQUATE_SECURITY
}
#: How grpc maps a response's HTTP status to a status when it has no grpc-status.
_HTTP_STATUS = {
    "400": "INTERNAL",
    "401": "UNAUTHENTICATED",
    "403": "PERMISSION_DENIED",
    "404": "UNIMPLEMENTED",
    "429": "UNAVAILABLE",
    "502": "UNAVAILABLE",
    "503": "UNAVAILABLE",
    "504": "UNAVAILABLE",
}
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class CallError(KVPeerError):
    """A call ended with a status other than OK, named as grpc names it.

    ``str(error)`` is ``"CODE: details"``, like grpc's errors.
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class ConnectFailed(CallError):
    """UNAVAILABLE before any byte was sent: no TCP connection (refused, unreachable)."""


def check_response_head(fields: dict[str, str], endpoint: Endpoint, *, trailers_only: bool) -> None:
    """Raise unless a response's first header block opens a gRPC response (or is trailers-only).

    Raises:
        CallError: a status other than 200 (named as grpc maps it).
        WireError: a content-type that is not gRPC.
    """
    status = fields.get(":status", "")
    if trailers_only and "grpc-status" in fields:
        return
    if status != "200":
        code = _HTTP_STATUS.get(status, "UNKNOWN")
        raise CallError(code, f"{endpoint} answered HTTP status {status!r}")
    content_type = fields.get("content-type", "")
    if not content_type.startswith("application/grpc"):
        raise WireError(f"the response's content-type is {content_type!r}, not gRPC")


def grpc_status(fields: dict[str, str]) -> tuple[str, str]:
    """(status name, message) from trailers; a missing or bad grpc-status is UNKNOWN."""
    message = h2.decode_grpc_message(fields.get("grpc-message", ""))
    raw = fields.get("grpc-status")
    if raw is None:
        return "UNKNOWN", f"no grpc-status in the trailers {message}".strip()
    try:
        return _STATUS_NAMES[int(raw)], message
    except (ValueError, KeyError):
        return "UNKNOWN", f"grpc-status {raw[:32]!r} is not a status code {message}".strip()
