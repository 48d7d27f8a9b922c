"""``kvpeer proxy``'s settings: the node lists, routing and timeouts, checked once at start.

:meth:`ProxyConfig.create` validates everything a user gives (URLs, kvpeer
endpoints, routing options, timeouts) and raises :class:`ConfigError` naming the
flag at fault; :mod:`.server` then trusts the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.keys import KeySpec
from kvpeer.api.security import Security
from kvpeer.proxy.routing import NodeRef, RoutePolicy, check_route_options, parse_node_ref


@dataclass(frozen=True)
class PrefillNode:
    """A prefill node: its HTTP base URL and, when known, its kvpeer endpoint."""

    url: str
    kvpeer: Endpoint | None = None
    #: The node's directory node id, when it is not its kvpeer endpoint.
    node_id: str | None = None


@dataclass(frozen=True)
class ProxyConfig:
    """Validated proxy settings. Build with :meth:`create` to get checked values."""

    prefill: tuple[PrefillNode, ...]
    decode: tuple[str, ...]
    #: Start the decode request without waiting for the prefill answer.
    concurrent: bool = False
    #: Longest wait for a node: the whole prefill request, the decode answer's
    #: headers, and each gap between streamed decode chunks.
    timeout_s: float = 600.0
    #: Longest wait to open a connection to a node.
    connect_timeout_s: float = 10.0
    #: Longest wait for a node's ``/health`` or ``/v1/models``.
    health_timeout_s: float = 5.0
    #: Largest request body accepted from a client.
    max_body_bytes: int = 64 << 20
    #: How nodes are picked (:mod:`kvpeer.proxy.routing`).
    route: RoutePolicy = RoutePolicy.ROUND_ROBIN
    #: Each decode node's directory identity, in the order of ``decode`` (or empty).
    decode_refs: tuple[NodeRef | None, ...] = ()
    #: The directory ``host:port`` (or its replicas) prefix routing asks.
    directory: tuple[str, ...] | None = None
    #: The settings chunk keys are computed with (the nodes' settings).
    key_spec: KeySpec | None = None
    #: Deadline of the directory call that routes one request.
    route_timeout_s: float = 0.005
    #: Credentials presented to the directory (TLS files, bearer token).
    directory_security: Security | None = None

    @classmethod
    def create(
        cls,
        prefill_urls: Sequence[str],
        decode_urls: Sequence[str],
        prefill_kvpeer: Sequence[str] = (),
        decode_kvpeer: Sequence[str] = (),
        **options: Any,
    ) -> ProxyConfig:
        """Validate node lists; raise :class:`ConfigError` naming the option at fault.

        ``prefill_kvpeer`` lists each prefill node's kvpeer ``[NODE_ID=]host:port`` in
        the order of ``prefill_urls``; empty means the decode nodes find producers
        through the directory. ``decode_kvpeer`` does the same for decode nodes (for
        routing only). ``options`` are the other fields (timeouts, ``concurrent``,
        ``route``, ``directory``, ``key_spec``, ``route_timeout_s``).
        """
        if not prefill_urls:
            raise ConfigError("--prefill", "give at least one prefill node URL")
        if not decode_urls:
            raise ConfigError("--decode", "give at least one decode node URL")
        if prefill_kvpeer and len(prefill_kvpeer) != len(prefill_urls):
            raise ConfigError(
                "--prefill-kvpeer",
                f"got {len(prefill_kvpeer)} endpoint(s) for {len(prefill_urls)} prefill "
                "URL(s); give one kvpeer host:port per --prefill URL, in the same order",
            )
        if decode_kvpeer and len(decode_kvpeer) != len(decode_urls):
            raise ConfigError(
                "--decode-kvpeer",
                f"got {len(decode_kvpeer)} endpoint(s) for {len(decode_urls)} decode "
                "URL(s); give one kvpeer [NODE_ID=]host:port per --decode URL, in the same order",
            )
        prefill_refs = [
            parse_node_ref(prefill_kvpeer[i], key=f"--prefill-kvpeer[{i}]")
            if prefill_kvpeer
            else None
            for i in range(len(prefill_urls))
        ]
        prefill = tuple(
            PrefillNode(
                parse_node_url(url, key=f"--prefill[{i}]"),
                ref.endpoint if ref is not None else None,
                ref.node_id if ref is not None else None,
            )
            for (i, url), ref in zip(enumerate(prefill_urls), prefill_refs, strict=True)
        )
        options["decode_refs"] = tuple(
            parse_node_ref(text, key=f"--decode-kvpeer[{i}]")
            for i, text in enumerate(decode_kvpeer)
        )
        check_route_options(options, mapped=bool(decode_kvpeer or prefill_kvpeer))
        decode = tuple(
            parse_node_url(url, key=f"--decode[{i}]") for i, url in enumerate(decode_urls)
        )
        for name in ("timeout_s", "connect_timeout_s", "health_timeout_s", "route_timeout_s"):
            value = options.get(name, 1)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise ConfigError(flag, f"expected a positive number of seconds, got {value!r}")
        return cls(prefill=prefill, decode=decode, **options)


def parse_node_url(text: str, *, key: str) -> str:
    """Check a node's base URL (``http[s]://host:port[/prefix]``); return it without a trailing /."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https"):
        raise ConfigError(key, f"expected an http:// or https:// URL, got {text!r}")
    if not parts.hostname:
        raise ConfigError(key, f"missing host in {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(key, f"invalid port in {text!r}") from exc
    if parts.query or parts.fragment:
        raise ConfigError(key, f"a node URL takes no query or fragment, got {text!r}")
    return text.strip().rstrip("/")
