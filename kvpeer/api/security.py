"""Transport security shared by every kvpeer server and client: TLS, mutual TLS, bearer token.

One :class:`Security` describes a process's credentials. A node uses the same
object for its server (peers dial it) and its clients (it dials peers and the
directory), so a cluster is configured with one set of PEM files and one token:

- ``tls.cert`` + ``tls.key``: this process's certificate, served to clients and,
  under mutual TLS, presented to servers;
- ``tls.ca``: the CA that signs the other side's certificate. On a server it turns
  on mutual TLS (clients without a certificate from this CA are refused);
- ``tls.server_name``: the name to verify in server certificates when it differs
  from the host dialled (e.g. dialling 127.0.0.1 with a certificate for ``kvpeer``);
- ``auth_token_file``: a bearer token; servers answer UNAUTHENTICATED to calls
  without it, clients send it on every call.

Who a caller is and what it may do (``tls.identity``, ``tls.identity_map``,
``read_only_token_file``, ``node_tokens``) is :mod:`kvpeer.api.identity`'s
:class:`~kvpeer.api.identity.AccessPolicy`, held in :attr:`Security.access`.
Without those settings every admitted caller is trusted as any node.
"""

from __future__ import annotations

import hmac
import ssl
import tempfile
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvpeer.api import cert_reload
from kvpeer.api.errors import ConfigError
from kvpeer.api.identity import AccessPolicy

TOKEN_HEADER = "authorization"
_TLS_KEYS = frozenset({"cert", "key", "ca", "server_name", "identity", "identity_map"})
# Health checks stay open so orchestrators can probe without the token.
_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def _read_file(path: object, key: str) -> bytes:
    if not isinstance(path, str) or not path:
        raise ConfigError(key, f"expected a file path, got {path!r}")
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise ConfigError(key, f"{path!r} is empty")
    return data


@dataclass(frozen=True)
class TLSFiles:
    """PEM bytes read at start-up, so a bad path fails then and not at the first call."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None
    #: ``tls.identity`` / ``tls.identity_map`` as given (read by AccessPolicy.from_config).
    identity: str | None = None
    identity_map: str | None = None
    #: (name, path) of each PEM file read, so servers can reload them (certificate rotation).
    paths: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, value: object, key: str = "tls") -> TLSFiles:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected an object with cert/key/ca paths, got {value!r}")
        unknown = sorted(set(value) - _TLS_KEYS)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; known: {sorted(_TLS_KEYS)}")
        if ("cert" in value) != ("key" in value):
            missing = "key" if "cert" in value else "cert"
            raise ConfigError(f"{key}.{missing}", "cert and key must be given together")
        if not value:
            raise ConfigError(key, "give at least cert and key, or ca")
        files = {
            name: _read_file(value[name], f"{key}.{name}")
            for name in ("cert", "key", "ca")
            if name in value
        }
        if b"PRIVATE KEY" not in files.get("key", b"PRIVATE KEY"):
            raise ConfigError(f"{key}.key", "not a PEM private key")
        for name in ("cert", "ca"):
            if name in files and b"BEGIN CERTIFICATE" not in files[name]:
                raise ConfigError(f"{key}.{name}", "not a PEM certificate")
        server_name = value.get("server_name")
        if server_name is not None and (not isinstance(server_name, str) or not server_name):
            raise ConfigError(f"{key}.server_name", f"expected a host name, got {server_name!r}")
        paths = tuple((name, str(value[name])) for name in ("cert", "key", "ca") if name in value)
        return cls(
            server_name=server_name,
            identity=value.get("identity"),
            identity_map=value.get("identity_map"),
            paths=paths,
            **files,
        )


@dataclass(frozen=True)
class Security:
    """Credentials of one process; the default is plaintext without a token."""

    tls: TLSFiles | None = None
    token: str | None = None
    #: Who callers are and what they may do (servers); binds nothing by default.
    access: AccessPolicy = field(default_factory=AccessPolicy)

    @classmethod
    def from_config(
        cls,
        tls: object = None,
        auth_token_file: object = None,
        *,
        prefix: str = "",
        read_only_token_file: object = None,
        node_tokens: object = None,
    ) -> Security:
        """Build from config values; errors name ``{prefix}tls...`` / ``{prefix}auth_token_file``.

        ``read_only_token_file`` and ``node_tokens`` (and ``tls.identity``) are the
        server-side role settings of :meth:`kvpeer.api.identity.AccessPolicy.from_config`.
        """
        files = None if tls is None else TLSFiles.from_config(tls, f"{prefix}tls")
        token = None
        if auth_token_file is not None:
            key = f"{prefix}auth_token_file"
            token = _read_file(auth_token_file, key).decode("utf-8", "replace").strip()
            if any(c.isspace() for c in token):
                raise ConfigError(key, "the token must be one line without spaces")
        if files is not None and files.identity is not None and files.ca is None:
            raise ConfigError(
                f"{prefix}tls.identity", "needs tls.ca: identities come from client certificates"
            )
        access = AccessPolicy.from_config(
            identity=None if files is None else files.identity,
            identity_map=None if files is None else files.identity_map,
            shared_token=token,
            read_only_token_file=read_only_token_file,
            node_tokens=node_tokens,
            prefix=prefix,
        )
        return cls(tls=files, token=token, access=access)

    # -- server side ---------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for ``add_secure_port``; None means plaintext.

        When the PEM files came from paths, changed files are picked up at the next
        handshake (:mod:`kvpeer.api.cert_reload`): rotation needs no restart.
        """
        if self.tls is None:
            return None
        if self.tls.cert is None or self.tls.key is None:
            raise ConfigError("tls.cert", "a server needs a certificate and key to serve TLS")
        if self.tls.paths:
            return cert_reload.dynamic_server_credentials(
                self.tls.cert, self.tls.key, self.tls.ca, dict(self.tls.paths)
            )
        return grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)],
            root_certificates=self.tls.ca,
            require_client_auth=self.tls.ca is not None,
        )

    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        if self.access.tokens:
            return [_TokenCheck(self.token_refusal)]
        return [] if self.token is None else [_TokenCheck(self.token_refusal)]

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS as :meth:`server_credentials` for servers not run by grpcio (ALPN ``h2``).

        None means plaintext. With ``tls.ca``, clients must present a certificate it signed.
        """
        if self.tls is None:
            return None
        if self.tls.cert is None or self.tls.key is None:
            raise ConfigError("tls.cert", "a server needs a certificate and key to serve TLS")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP/2 requires TLS 1.2 or later
        _load_cert_chain(context, self.tls.cert, self.tls.key)
        if self.tls.ca is not None:
            context.load_verify_locations(cadata=self.tls.ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        if self.tls.paths:  # reload changed PEM files at the next handshake
            cert_reload.watch_ssl_context(context, dict(self.tls.paths))
        return context

    def token_refusal(self, presented: bytes | None) -> str | None:
        """Why a call presenting ``presented`` as ``authorization`` is refused; None admits it.

        Constant-time comparison; every server checks tokens through here. With role
        tokens (:attr:`access`), any configured token is admitted here; what it may
        do is decided per call from :meth:`AccessPolicy.principal_of`.
        """
        if self.access.tokens:
            return self.access.token_refusal(presented)
        if self.token is None:
            return None
        return _token_refusal(f"Bearer {self.token}".encode(), presented)

    # -- client side ---------------------------------------------------------

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS as :meth:`open_channel` for clients not run by grpcio (ALPN ``h2``).

        None means plaintext. Verifies the server against ``tls.ca`` (the system's CAs
        without it) and presents ``tls.cert`` when given (mutual TLS).
        """
        if self.tls is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.tls.ca is not None:
            context.load_verify_locations(cadata=self.tls.ca.decode("ascii", "replace"))
        else:
            context.load_default_certs()
        if self.tls.cert is not None and self.tls.key is not None:
            _load_cert_chain(context, self.tls.cert, self.tls.key)
        context.set_alpn_protocols(["h2"])
        return context

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.tls is not None and self.tls.server_name:
            return [("grpc.ssl_target_name_override", self.tls.server_name)]
        return []

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for a client channel (sync or asyncio); None means plaintext."""
        if self.tls is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca,
            private_key=self.tls.key,
            certificate_chain=self.tls.cert,
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The metadata that carries the bearer token (asyncio channels pass it per call)."""
        return None if self.token is None else ((TOKEN_HEADER, f"Bearer {self.token}"),)

    def open_channel(
        self, target: str, options: list[tuple[str, Any]] | None = None
    ) -> grpc.Channel:
        """A channel to ``target`` that presents these credentials on every call."""
        opts = [*(options or []), *self.channel_options()]
        creds = self.channel_credentials()
        if creds is None:
            channel = grpc.insecure_channel(target, options=opts)
        else:
            channel = grpc.secure_channel(target, creds, options=opts)
        if self.token is not None:
            channel = grpc.intercept_channel(channel, _TokenAttach(self.token))
        return channel

    def open_aio_channel(
        self, target: str, options: list[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``target`` with these TLS credentials.

        The token is not attached by the channel: pass :meth:`call_metadata` with
        each call.
        """
        opts = [*(options or []), *self.channel_options()]
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, creds, options=opts)


def _load_cert_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a PEM certificate and key held in memory (``ssl`` reads chains from files only)."""
    with tempfile.TemporaryDirectory(prefix="kvpeer-tls-") as directory:
        cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)


def _token_refusal(expected: bytes, presented: bytes | None) -> str | None:
    if presented is not None and hmac.compare_digest(presented, expected):
        return None
    reason = "missing bearer token" if presented is None else "wrong bearer token"
    return f"{reason}: set auth_token_file to this cluster's token"


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses calls whose ``authorization`` metadata is not an accepted ``Bearer <token>``."""

    def __init__(self, refusal: Callable[[bytes | None], str | None]) -> None:
        self._refusal = refusal

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(_UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        presented = None
        for name, value in handler_call_details.invocation_metadata or ():
            if name == TOKEN_HEADER:
                presented = value.encode() if isinstance(value, str) else value
                break
        refusal = self._refusal(presented)
        if refusal is None:
            return continuation(handler_call_details)
        return _deny(continuation(handler_call_details), refusal)


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is not None and handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(abort)
        return grpc.unary_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class _CallDetails(
    namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """The call details grpc passes on, with our metadata added."""


class _TokenAttach(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every outgoing call."""

    def __init__(self, token: str) -> None:
        self._header = (TOKEN_HEADER, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
