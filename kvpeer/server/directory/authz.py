"""Who may call which directory method: identity binding, roles, namespace allow-lists.

:class:`DirectoryAuthz` is asked by the servicer before every call (:meth:`admit`)
and decides with the caller's :class:`~kvpeer.api.identity.Principal`:

- **writes** (:data:`WRITE_METHODS`: Join, Heartbeat, Publish, Withdraw, Leave)
  carry a ``node_id``; a ``node`` may write only as its own node id, an ``admin``
  as any, a ``reader`` never. Refusals are PERMISSION_DENIED and name both the
  caller and the node id it asked for.
- **reads** (every other method, including ones added later) are open to every
  authenticated principal.
- **namespaces**: with an allow-list (:class:`NamespaceAllowList`), a fingerprint
  listed there is served only to the identities it names (and to admins): Join,
  Locate and any call naming that fingerprint are PERMISSION_DENIED for others,
  and ListNodes leaves its nodes out. Fingerprints not listed stay open.
- **epochs**: ListNodes shows a node's epoch only to principals that may act as it
  (:meth:`sees_epoch`); others see 0.

With the default policy (nothing bound, :data:`~kvpeer.api.identity.TRUSTED`) and
no allow-list, :meth:`admit` returns at once without reading the call's context.
The stores are not involved: authorisation happens before a store is called.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvpeer.api.errors import ConfigError, WireError
from kvpeer.api.fingerprint import Fingerprint, is_digest
from kvpeer.api.identity import TRUSTED, AccessPolicy, AccessRefused, Principal, Role

log = logging.getLogger(__name__)

#: Methods that change the directory on behalf of ``request.node_id``.
WRITE_METHODS = frozenset({"Join", "Heartbeat", "Publish", "Withdraw", "Leave"})


class Denied(Exception):
    """A call authorisation refuses; ``code`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class NamespaceAllowList:
    """Fingerprint digest -> the identities (principal names or node ids) allowed on it."""

    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: object, key: str = "namespace_allow") -> NamespaceAllowList:
        """Read ``{"<32-hex digest>": ["node-a", "router-1", ...]}``; ConfigError names ``key``."""
        if not isinstance(path, str) or not path:
            raise ConfigError(key, f"expected a JSON file path, got {path!r}")
        try:
            value = json.loads(Path(path).expanduser().read_text())
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ConfigError(key, f"{path!r} is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a JSON object {fingerprint digest: [identities]}")
        allowed: dict[str, frozenset[str]] = {}
        for digest, names in value.items():
            if not is_digest(digest):
                raise ConfigError(f"{key}[{digest!r}]", "not a fingerprint digest (32 hex digits)")
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"{key}[{digest!r}]", "expected a list of identities")
            allowed[digest] = frozenset(names)
        return cls(allowed)

    def allows(self, principal: Principal, digest: str) -> bool:
        """True if ``principal`` may see namespace ``digest`` (unlisted namespaces are open)."""
        names = self.allowed.get(digest)
        if names is None or principal.role is Role.ADMIN:
            return True
        return principal.name in names or (
            principal.node_id is not None and principal.node_id in names
        )


class DirectoryAuthz:
    """The directory's authorisation decisions (see the module docstring). Thread-safe."""

    def __init__(
        self, policy: AccessPolicy | None = None, namespaces: NamespaceAllowList | None = None
    ) -> None:
        self.policy = policy or AccessPolicy()
        self.namespaces = namespaces
        self._open = not self.policy.enforcing and not (namespaces and namespaces.allowed)

    def principal(self, context: grpc.ServicerContext) -> Principal:
        """The caller; :class:`Denied` (UNAUTHENTICATED) when its credentials map to none."""
        if self._open:
            return TRUSTED
        try:
            return self.policy.principal_of(context)
        except AccessRefused as exc:
            raise Denied(exc.code, exc.message) from None

    def admit(self, method: str, request: Any, context: grpc.ServicerContext) -> Principal:
        """The caller of ``method`` if it may make this call; else :class:`Denied`.

        Reads ``request.node_id`` of writes and the fingerprint a request names
        (``fingerprint`` digest, or Join's Fingerprint message) for the allow-list.
        Malformed fields are left to the servicer's validation (INVALID_ARGUMENT).
        """
        if self._open:
            return TRUSTED
        principal = self.principal(context)
        if method in WRITE_METHODS:
            node_id = str(getattr(request, "node_id", ""))
            if not principal.may_act_as(node_id):
                why = (
                    "a read-only caller may not write"
                    if principal.role is Role.READER
                    else "a node may write only as itself"
                )
                log.warning(
                    "refused %s as node %r by %s", method, node_id[:80], principal.describe()
                )
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.describe()} may not {method} as node {node_id[:80]!r}: {why}",
                )
        digest = _digest_of(request)
        if digest is not None and not self.sees_namespace(principal, digest):
            log.warning("refused %s on namespace %s to %s", method, digest, principal.describe())
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"namespace {digest} is not open to {principal.describe()} (namespace allow-list)",
            )
        return principal

    def sees_namespace(self, principal: Principal, digest: str) -> bool:
        """True if ``principal`` may be told about namespace ``digest``."""
        return self.namespaces is None or self.namespaces.allows(principal, digest)

    @staticmethod
    def sees_epoch(principal: Principal, node_id: str) -> bool:
        """True if ``principal`` may learn ``node_id``'s epoch (it may act as that node)."""
        return principal.may_act_as(node_id)


def _digest_of(request: Any) -> str | None:
    """The fingerprint digest a request names, or None (none, or malformed)."""
    value = getattr(request, "fingerprint", None)
    if isinstance(value, str):
        return value if is_digest(value) else None
    if value is None or not hasattr(request, "HasField"):
        return None
    try:
        if not request.HasField("fingerprint"):
            return None
        return Fingerprint.from_proto(value).digest
    except (ValueError, WireError):
        return None
