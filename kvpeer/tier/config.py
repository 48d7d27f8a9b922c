"""PeerSecondaryTier configuration: the keys a user writes in ``secondary_tiers``.

vLLM passes every key of the tier's dict (except ``type``, ``module_path`` and
``backpressure``) to the tier's constructor; :meth:`TierConfig.from_kwargs`
validates them all at start-up. Unknown keys and bad values raise
:class:`~kvpeer.api.errors.ConfigError` naming the key, so a typo fails
``vllm serve`` at once instead of silently disabling sharing.

This module does not import vLLM: the compose checks and ``kvpeer inspect`` use
it too.

Why hand-written, not pydantic (issue 14; vLLM depends on it, kvpeer's core does
not): the config is parsed once at start-up, so speed is no argument either way;
pydantic would add a dependency (and 35-48 ms of import, measured here) to the
directory, the proxy and ``kvpeer inspect``, which run without vLLM, and its
``ValidationError`` would still need turning into a :class:`ConfigError` that
names the key and suggests the nearest known one (``difflib``), which is most of
this module. A dataclass with a ``from_kwargs`` of plain checks says the same
in fewer moving parts.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvpeer import DEFAULT_PEER_PORT
from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.security import Security

_LOCALITIES = ("LOCAL", "REMOTE")


@dataclass(frozen=True)
class TierConfig:
    """Validated tier settings. Durations are seconds."""

    #: host:port of the directory service, or of several replicas on one Redis
    #: (a list, or comma-separated); empty uses only ``peers``.
    directory: tuple[Endpoint, ...] = ()
    #: Static peer endpoints, asked directly when there is no directory (or in addition).
    peers: tuple[Endpoint, ...] = ()
    #: Where this node's chunk server binds. Port 0 picks a free port (tests).
    listen: Endpoint = Endpoint("0.0.0.0", DEFAULT_PEER_PORT)  # noqa: RUF009 - immutable
    #: Port of the fast Pull listener on ``listen``'s host (Pull only, rows sent
    #: without copies; peers learn it in the handshake): 0 picks a free one, a
    #: number fixes it (to publish it), None (``"off"``) serves Pull on ``listen`` only.
    pull_port: int | None = 0
    #: The address peers dial; required when ``listen`` binds every interface.
    advertise: Endpoint | None = None
    #: Stable name of this node in the directory; defaults to the advertised address.
    node_id: str | None = None
    security: Security = field(default_factory=Security)
    #: vLLM's tier locality (it passes ``locality`` to every tier).
    locality: str = "REMOTE"
    #: How long a lookup may answer RETRY before it becomes MISS.
    lookup_timeout_s: float = 2.0
    #: Deadline of each control call (handshake, lookup, release, directory calls).
    rpc_timeout_s: float = 5.0
    #: Deadline of one pull (all chunks of one vLLM load job).
    pull_timeout_s: float = 60.0
    #: Concurrent gRPC streams one pull is split over.
    pull_streams: int = 4
    #: How pulls read rows: ``h2`` (rows read straight into vLLM's primary rows) or
    #: ``grpc`` (through grpcio's Python layer: slower, kept as a fallback).
    pull_transport: str = "h2"
    #: Concurrent pulls this node runs at once (further jobs queue).
    max_concurrent_pulls: int = 4
    #: Same-host fast path: ``auto`` copies rows straight from a holder's shared-memory
    #: region when both nodes are on one host and the region opens (else the network
    #: pull); ``off`` always pulls over the network and offers no region to peers.
    same_host: str = "auto"
    #: How long a lease pins chunks for a peer that neither pulls nor releases.
    lease_ttl_s: float = 30.0
    #: How long a PD producer keeps a handoff's chunks pinned for its consumer.
    handoff_timeout_s: float = 60.0
    #: How long a PD consumer waits for its producer's chunks (decode-first ordering)
    #: before it recomputes them.
    handoff_wait_s: float = 30.0
    #: Keys per Publish/Withdraw call; publishing is batched in the background.
    publish_batch_keys: int = 1024
    #: Longest a published key waits for its batch to fill.
    publish_interval_s: float = 0.05
    #: Period of the check that published keys are still held (0 disables it).
    reconcile_interval_s: float = 30.0
    #: Keys checked per reconciliation round.
    reconcile_batch_keys: int = 256
    #: Most keys in one inbound Lookup.
    max_lookup_keys: int = 4096
    #: gRPC handler threads of the chunk server.
    server_workers: int = 16

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> TierConfig:
        """Validate the tier's constructor kwargs; raise ConfigError naming the first bad key."""
        known = _PARSERS.keys()
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = (
                    f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}"
                )
                raise ConfigError(key, f"unknown PeerSecondaryTier key{hint}")
        values: dict[str, Any] = {}
        for key, raw in kwargs.items():
            if key in _SECURITY_KEYS:
                continue
            values[key] = _PARSERS[key](raw, key)
        if any(key in kwargs for key in _SECURITY_KEYS):
            values["security"] = Security.from_config(
                kwargs.get("tls"),
                kwargs.get("auth_token_file"),
                read_only_token_file=kwargs.get("read_only_token_file"),
                node_tokens=kwargs.get("node_tokens"),
            )
        config = cls(**values)
        config._check_consistency()
        return config

    def _check_consistency(self) -> None:
        if self.listen.is_wildcard and self.advertise is None:
            raise ConfigError(
                "advertise",
                f"required when listen binds every interface ({self.listen}): "
                "give the host:port peers should dial, e.g. 'prefill-0:7601'",
            )
        if self.advertise is not None and self.advertise.is_wildcard:
            raise ConfigError("advertise", f"{self.advertise} is not an address peers can dial")
        if self.pull_port and self.pull_port == self.listen.port:
            raise ConfigError("pull_port", f"must differ from listen's port {self.listen.port}")
        if self.publish_batch_keys > self.max_lookup_keys:
            raise ConfigError("publish_batch_keys", "must not exceed max_lookup_keys")

    @property
    def advertised(self) -> Endpoint:
        """The endpoint peers dial: ``advertise``, or ``listen`` when it names a host."""
        return self.advertise or self.listen

    def describe(self) -> dict[str, str]:
        """Printable settings, for logs and ``config_info``; secrets are not shown."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "security":
                out["tls"] = (
                    "mutual" if value.tls and value.tls.ca else ("on" if value.tls else "off")
                )
                out["auth_token"] = "on" if value.token else "off"
            elif f.name in ("peers", "directory"):
                out[f.name] = ",".join(map(str, value))
            else:
                out[f.name] = "" if value is None else str(value)
        return out


def _endpoint(raw: Any, key: str) -> Endpoint:
    return parse_endpoint(raw, key=key, allow_port_zero=key == "listen")


def _optional_endpoint(raw: Any, key: str) -> Endpoint | None:
    return None if raw is None else _endpoint(raw, key)


def _pull_port(raw: Any, key: str) -> int | None:
    if raw == "off":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ConfigError(key, f"expected a port (0: any free port) or 'off', got {raw!r}")
    return raw


def _peers(raw: Any, key: str) -> tuple[Endpoint, ...]:
    if isinstance(raw, str):
        raw = [p for p in raw.split(",") if p.strip()]
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(key, f"expected a list of 'host:port', got {raw!r}")
    return tuple(parse_endpoint(p, key=f"{key}[{i}]") for i, p in enumerate(raw))


def _directories(raw: Any, key: str) -> tuple[Endpoint, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str) and "," not in raw:
        return (parse_endpoint(raw, key=key),)  # the common case: name the key itself
    endpoints = _peers(raw, key)
    if not endpoints:
        raise ConfigError(key, "expected 'host:port' or a list of directory replicas, got none")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(key, f"a replica is listed twice: {', '.join(map(str, endpoints))}")
    return endpoints


def _node_id(raw: Any, key: str) -> str:
    if not isinstance(raw, str) or not raw or len(raw) > 128 or not raw.isprintable():
        raise ConfigError(key, f"expected a printable name of 1-128 characters, got {raw!r}")
    return raw


def _locality(raw: Any, key: str) -> str:
    value = raw.upper() if isinstance(raw, str) else raw
    if value not in _LOCALITIES:
        raise ConfigError(key, f"expected one of {_LOCALITIES}, got {raw!r}")
    return value


def _choice(*allowed: str):
    def parse(raw: Any, key: str) -> str:
        if raw not in allowed:
            raise ConfigError(key, f"expected one of {list(allowed)}, got {raw!r}")
        return raw

    return parse


def _seconds(low: float, high: float, *, allow_zero: bool = False):
    def parse(raw: Any, key: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, f"expected a number of seconds, got {raw!r}")
        value = float(raw)
        if allow_zero and value == 0:
            return 0.0
        if not low <= value <= high:
            raise ConfigError(key, f"{value} is outside [{low}, {high}] seconds")
        return value

    return parse


def _count(low: int, high: int):
    def parse(raw: Any, key: str) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, f"expected an integer, got {raw!r}")
        if not low <= raw <= high:
            raise ConfigError(key, f"{raw} is outside [{low}, {high}]")
        return raw

    return parse


#: Keys read by Security.from_config (TLS, tokens, identities: kvpeer/api/identity.py).
_SECURITY_KEYS = ("tls", "auth_token_file", "read_only_token_file", "node_tokens")

_PARSERS = {
    "directory": _directories,
    "peers": _peers,
    "listen": _endpoint,
    "pull_port": _pull_port,
    "advertise": _optional_endpoint,
    "node_id": _node_id,
    "tls": None,
    "auth_token_file": None,
    "read_only_token_file": None,
    "node_tokens": None,
    "locality": _locality,
    "lookup_timeout_s": _seconds(0.01, 600),
    "rpc_timeout_s": _seconds(0.01, 600),
    "pull_timeout_s": _seconds(0.1, 3600),
    "pull_streams": _count(1, 64),
    "pull_transport": _choice("h2", "grpc"),
    "max_concurrent_pulls": _count(1, 256),
    "same_host": _choice("auto", "off"),
    "lease_ttl_s": _seconds(0.1, 3600),
    "handoff_timeout_s": _seconds(0.1, 3600),
    "handoff_wait_s": _seconds(0.01, 3600),
    "publish_batch_keys": _count(1, 65536),
    "publish_interval_s": _seconds(0.001, 60),
    "reconcile_interval_s": _seconds(1, 86400, allow_zero=True),
    "reconcile_batch_keys": _count(1, 65536),
    "max_lookup_keys": _count(1, 65536),
    "server_workers": _count(2, 1024),
}
