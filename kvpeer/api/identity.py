"""Who a caller is and what it may do: how a credential maps to a :class:`Principal`.

Three roles (:class:`Role`):

- ``reader``: read-only. Directory reads (Locate, ListNodes, Stats and any other call
  that is not a write); a chunk server's Handshake. Routers, ``kvpeer proxy``,
  operators with grpcurl.
- ``node``: one node. Reads, and writes (Join, Heartbeat, Publish, Withdraw, Leave)
  **as its own node id only**; Lookup/Pull/Release on chunk servers.
- ``admin``: everything, as any node id; sees every epoch. This is also the role of
  every caller when nothing binds identities (see below): "all nodes trusted".

How credentials map (:class:`AccessPolicy`):

- **Certificates** (mutual TLS, ``tls.identity`` set): the certificate's identity is
  its first URI SAN (``san-uri``, e.g. a SPIFFE id), its first DNS SAN (``san-dns``)
  or its subject CN (``cn``). ``tls.identity_map`` (a JSON file) maps an identity
  to a node id (``"spiffe://c/n/a": "node-a"``) or to a role
  (``"router-1": {"role": "reader"}``, ``"ops": {"role": "admin"}``); an identity
  not in the map is a node whose node id *is* the identity (the default). A
  certificate without the chosen field is refused (UNAUTHENTICATED). When
  ``tls.identity`` is set the certificate decides the principal; tokens, when
  configured, must still be valid.
- **Tokens** (``authorization: Bearer ...``): ``read_only_token_file`` is a reader;
  ``node_tokens`` (JSON ``{node id: token file}``) binds each token to its node id;
  the shared ``auth_token_file`` is admin ("all nodes trusted"), unless it is one of
  the reader or node tokens (a node then sends its own token as ``auth_token_file``).
  Tokens are compared in constant time, against every configured token.
- **Nothing new configured** (no ``tls.identity``, no reader or node token): every
  caller the transport admits (shared CA, shared token, or none) is admin, exactly
  kvpeer's behaviour before identities existed.

Secrets never leave this module: principals name tokens by role ("read-only
token", "node token of 'a'"), never by value.
"""

from __future__ import annotations

import enum
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvpeer.api.errors import ConfigError

#: Values of ``tls.identity``: which certificate field is the caller's identity.
IDENTITY_FIELDS = ("san-uri", "san-dns", "cn")
#: The gRPC auth-context property holding each field (grpc core fills them from the cert).
_AUTH_CONTEXT_PROPERTY = {"san-uri": "peer_uri", "san-dns": "peer_dns", "cn": "x509_common_name"}
#: The ``ssl.SSLSocket.getpeercert()`` SAN type of each SAN field.
_PEERCERT_SAN = {"san-uri": "URI", "san-dns": "DNS"}
TOKEN_HEADER = "authorization"
_MAX_IDENTITY_CHARS = 256


class Role(str, enum.Enum):
    """What a principal may do; see the module docstring."""

    READER = "reader"
    NODE = "node"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``name`` is for messages and logs (a certificate identity, or a token's role;
    never a secret). ``node_id`` is the only node id a ``node`` may act as.
    """

    name: str
    role: Role
    node_id: str | None = None

    def may_act_as(self, node_id: str) -> bool:
        """True if this principal may write (Join, Publish...) as ``node_id``."""
        if self.role is Role.ADMIN:
            return True
        return self.role is Role.NODE and self.node_id == node_id

    def describe(self) -> str:
        """E.g. ``node 'node-b'``, ``reader 'router-1'``: for refusal messages."""
        if self.role is Role.NODE and self.node_id != self.name:
            return f"node {self.node_id!r} ({self.name!r})"
        return f"{self.role.value} {self.name!r}"


#: The principal of every caller when no identity is bound: today's "all nodes trusted".
TRUSTED = Principal("trusted (no identities configured)", Role.ADMIN)


class AccessRefused(Exception):
    """A caller whose credentials map to no principal; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _printable(value: str, limit: int = 80) -> str:
    """``value`` shortened and quoted for a message (a caller chose it)."""
    return repr(value[:limit])


@dataclass(frozen=True)
class AccessPolicy:
    """How a server turns a call's credentials into a :class:`Principal`.

    Build with :meth:`from_config`; the default policy binds nothing (every admitted
    caller is :data:`TRUSTED`). Thread-safe (immutable).
    """

    #: Which certificate field is the identity (one of :data:`IDENTITY_FIELDS`); None: unused.
    identity: str | None = None
    #: Certificate identity -> principal, for identities that are not their node id.
    identity_map: Mapping[str, Principal] = field(default_factory=dict)
    #: ``Bearer <token>`` header bytes -> principal, every token the server accepts.
    tokens: tuple[tuple[bytes, Principal], ...] = ()

    @property
    def enforcing(self) -> bool:
        """True when callers can differ in what they may do (identities or role tokens)."""
        return self.identity is not None or any(p.role is not Role.ADMIN for _, p in self.tokens)

    @classmethod
    def from_config(
        cls,
        *,
        identity: object = None,
        identity_map: object = None,
        shared_token: str | None = None,
        read_only_token_file: object = None,
        node_tokens: object = None,
        prefix: str = "",
    ) -> AccessPolicy:
        """Validate the settings; ConfigError names ``{prefix}<key>``.

        Args:
            identity: ``tls.identity``: ``san-uri``, ``san-dns`` or ``cn``.
            identity_map: ``tls.identity_map``: path of a JSON object identity ->
                node id, or -> ``{"role": "reader"|"admin"|"node"[, "node_id": id]}``.
            shared_token: the ``auth_token_file`` token (admin unless it is a role token).
            read_only_token_file: path of the reader token.
            node_tokens: path of a JSON object node id -> token file path.
        """
        if identity is not None and identity not in IDENTITY_FIELDS:
            raise ConfigError(
                f"{prefix}tls.identity",
                f"{identity!r} is not one of {', '.join(IDENTITY_FIELDS)}",
            )
        mapping: dict[str, Principal] = {}
        if identity_map is not None:
            key = f"{prefix}tls.identity_map"
            if identity is None:
                raise ConfigError(key, "needs tls.identity (which certificate field to map)")
            mapping = _parse_identity_map(_read_json(identity_map, key), key)
        tokens: list[tuple[bytes, Principal]] = []
        if read_only_token_file is not None:
            key = f"{prefix}read_only_token_file"
            token = read_token(read_only_token_file, key)
            tokens.append((_header(token), Principal("read-only token", Role.READER)))
        if node_tokens is not None:
            key = f"{prefix}node_tokens"
            table = _read_json(node_tokens, key)
            if not isinstance(table, dict) or not table:
                raise ConfigError(key, "expected a JSON object {node id: token file}")
            for node_id, path in table.items():
                _check_node_id(node_id, f"{key}[{node_id!r}]")
                token = read_token(path, f"{key}[{node_id!r}]")
                tokens.append(
                    (_header(token), Principal(f"node token of {node_id!r}", Role.NODE, node_id))
                )
        seen: set[bytes] = set()
        for header, principal in tokens:
            if header in seen:
                raise ConfigError(
                    f"{prefix}node_tokens", f"{principal.name} is also another role's token"
                )
            seen.add(header)
        if shared_token is not None and _header(shared_token) not in seen:
            tokens.append((_header(shared_token), Principal("shared token", Role.ADMIN)))
        return cls(identity=identity, identity_map=mapping, tokens=tuple(tokens))

    # -- tokens ------------------------------------------------------------------

    def token_principal(self, presented: bytes | None) -> Principal | None:
        """The principal of the token ``presented`` (the header value); None if unknown.

        Compares against every configured token with :func:`hmac.compare_digest`
        and never stops early, so timing tells nothing about which token or prefix.
        """
        found = None
        candidate = presented if presented is not None else b""
        for header, principal in self.tokens:
            if hmac.compare_digest(candidate, header) and presented is not None:
                found = principal
        return found

    def token_refusal(self, presented: bytes | None) -> str | None:
        """Why a call presenting ``presented`` is refused; None admits it (or no tokens set)."""
        if not self.tokens or self.token_principal(presented) is not None:
            return None
        reason = "missing bearer token" if presented is None else "wrong bearer token"
        return f"{reason}: set auth_token_file to this cluster's token"

    # -- principals --------------------------------------------------------------

    def principal_of(self, context: grpc.ServicerContext) -> Principal:
        """The caller of a gRPC call (auth context and ``authorization`` metadata).

        Raises:
            AccessRefused: UNAUTHENTICATED when the credentials map to no principal.
        """
        if not self.enforcing:
            return TRUSTED
        cert_identity = None
        if self.identity is not None:
            cert_identity = identity_from_auth_context(context.auth_context(), self.identity)
        presented = None
        for name, value in context.invocation_metadata() or ():
            if name == TOKEN_HEADER:
                presented = value.encode() if isinstance(value, str) else value
                break
        return self.resolve(cert_identity, presented)

    def principal_of_peercert(
        self, cert: Mapping[str, Any] | None, token: bytes | None
    ) -> Principal:
        """The caller of a pull-port call: ``ssl.SSLSocket.getpeercert()`` and its token."""
        if not self.enforcing:
            return TRUSTED
        cert_identity = None
        if self.identity is not None:
            cert_identity = identity_from_peercert(cert, self.identity)
        return self.resolve(cert_identity, token)

    def resolve(self, cert_identity: str | None, token: bytes | None) -> Principal:
        """The principal for a certificate identity and a presented token (see the module doc).

        Raises:
            AccessRefused: UNAUTHENTICATED (no identity in the certificate, unknown token).
        """
        if not self.enforcing:
            return TRUSTED
        if self.tokens:
            refusal = self.token_refusal(token)
            if refusal is not None:
                raise AccessRefused(grpc.StatusCode.UNAUTHENTICATED, refusal)
        if self.identity is not None:
            if not cert_identity:
                raise AccessRefused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the client certificate has no {self.identity} identity "
                    "(tls.identity): present a certificate that names this node",
                )
            mapped = self.identity_map.get(cert_identity)
            if mapped is not None:
                return mapped
            return Principal(cert_identity, Role.NODE, cert_identity)
        principal = self.token_principal(token)
        return principal if principal is not None else TRUSTED


def identity_from_auth_context(auth: Mapping[str, Sequence[bytes]], rule: str) -> str | None:
    """The ``rule`` field (:data:`IDENTITY_FIELDS`) of a gRPC auth context's peer certificate."""
    values = auth.get(_AUTH_CONTEXT_PROPERTY[rule]) or ()
    for value in values:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if text:
            return text[:_MAX_IDENTITY_CHARS]
    return None


def identity_from_peercert(cert: Mapping[str, Any] | None, rule: str) -> str | None:
    """The ``rule`` field of a certificate as ``ssl.SSLSocket.getpeercert()`` returns it."""
    if not cert:
        return None
    if rule == "cn":
        for rdn in cert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName" and value:
                    return str(value)[:_MAX_IDENTITY_CHARS]
        return None
    wanted = _PEERCERT_SAN[rule]
    for kind, value in cert.get("subjectAltName", ()):
        if kind == wanted and value:
            return str(value)[:_MAX_IDENTITY_CHARS]
    return None


def read_token(path: object, key: str) -> str:
    """The one-line token in the file ``path``; ConfigError naming ``key`` otherwise."""
    if not isinstance(path, str) or not path:
        raise ConfigError(key, f"expected a file path, got {path!r}")
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from exc
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise ConfigError(key, f"{path!r} is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(key, "the token must be one line without spaces")
    return token


def _header(token: str) -> bytes:
    return f"Bearer {token}".encode()


def _read_json(path: object, key: str) -> Any:
    if not isinstance(path, str) or not path:
        raise ConfigError(key, f"expected a JSON file path, got {path!r}")
    try:
        return json.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(key, f"{path!r} is not JSON: {exc}") from exc


def _check_node_id(node_id: object, key: str) -> str:
    if (
        not isinstance(node_id, str)
        or not node_id
        or len(node_id) > 128
        or not node_id.isprintable()
        or " " in node_id
    ):
        raise ConfigError(key, f"{node_id!r} is not a node id (1 to 128 printable characters)")
    return node_id


def _parse_identity_map(value: Any, key: str) -> dict[str, Principal]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a JSON object {certificate identity: node id or role}")
    out: dict[str, Principal] = {}
    for identity, target in value.items():
        where = f"{key}[{identity!r}]"
        if isinstance(target, str):
            out[identity] = Principal(identity, Role.NODE, _check_node_id(target, where))
            continue
        if not isinstance(target, dict) or set(target) - {"role", "node_id"}:
            raise ConfigError(where, 'expected a node id or {"role": ..., "node_id": ...}')
        try:
            role = Role(target.get("role", "node"))
        except ValueError:
            raise ConfigError(
                f"{where}.role", f"{target.get('role')!r} is not one of reader, node, admin"
            ) from None
        node_id = target.get("node_id", identity if role is Role.NODE else None)
        if role is Role.NODE:
            _check_node_id(node_id, f"{where}.node_id")
        elif node_id is not None:
            raise ConfigError(f"{where}.node_id", f"only a node has a node id, not a {role.value}")
        out[identity] = Principal(identity, role, node_id)
    return out


def describe_policy(policy: AccessPolicy) -> str:
    """One line for start-up logs: what binds identities (no secrets)."""
    if not policy.enforcing:
        return "all callers trusted (no identities configured)"
    parts: list[str] = []
    if policy.identity is not None:
        parts.append(f"certificate identity {policy.identity}")
        if policy.identity_map:
            parts.append(f"{len(policy.identity_map)} mapped identities")
    roles: Iterable[Role] = (p.role for _, p in policy.tokens)
    counts = {r: 0 for r in Role}
    for role in roles:
        counts[role] += 1
    parts.extend(f"{n} {r.value} token{'s' if n > 1 else ''}" for r, n in counts.items() if n)
    return ", ".join(parts)
