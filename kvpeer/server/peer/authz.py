"""Who may call which chunk-server method (``kvpeer.v1.KVPeer``).

The caller's :class:`~kvpeer.api.identity.Principal` comes from the call's
credentials (:meth:`AccessPolicy.principal_of`: client certificate, token):

- Handshake: every authenticated principal (operators probe nodes with grpcurl);
  a ``node`` that names a ``node_id`` must name its own (PERMISSION_DENIED naming both).
- Lookup, Release, Pull, MapRows, CheckLease: ``node`` and ``admin`` only. KV bytes are tenants' data; a
  ``reader`` (router, proxy) never needs them (PERMISSION_DENIED), even holding a
  lease id. The pull port applies the same rule to its TLS session and token
  (:meth:`kvpeer.transport.server_frames.InboundFrames._role_refusal`).

With the default policy (nothing bound) every caller is admitted as before.
"""

from __future__ import annotations

import grpc

from kvpeer.api.identity import AccessPolicy, AccessRefused, Principal, Role

#: Methods that read or pin KV bytes.
DATA_METHODS = frozenset({"Lookup", "Release", "Pull", "MapRows", "CheckLease"})


def refusal(
    policy: AccessPolicy, context: grpc.ServicerContext, method: str, node_id: str = ""
) -> tuple[grpc.StatusCode, str] | tuple[None, Principal]:
    """``(code, message)`` if ``method`` is refused to this caller, else ``(None, principal)``."""
    try:
        principal = policy.principal_of(context)
    except AccessRefused as exc:
        return exc.code, exc.message
    if method in DATA_METHODS and principal.role is Role.READER:
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.describe()} may not {method}: read-only callers get no KV bytes",
        )
    if node_id and principal.role is Role.NODE and not principal.may_act_as(node_id):
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.describe()} may not {method} as node {node_id[:80]!r}: "
            "a node speaks only as itself",
        )
    return None, principal
