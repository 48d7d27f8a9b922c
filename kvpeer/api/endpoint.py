"""Parsing and formatting of ``host:port`` endpoints.

Every address a user writes (``listen``, ``advertise``, ``directory``,
``peers``, a PD ``source``) goes through :func:`parse_endpoint`, so they all
accept the same forms: ``host:port``, ``1.2.3.4:port``, ``[::1]:port``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from kvpeer.api.errors import ConfigError

_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9\-._]*[A-Za-z0-9])?")
#: An IPv6 literal between brackets, with an optional zone (``fe80::1%eth0``).
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9\-._]+)?")
_WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        """True when the host binds every interface, so peers cannot dial it as written."""
        return self.host in _WILDCARDS

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.host, port)


def parse_endpoint(text: object, *, key: str, allow_port_zero: bool = False) -> Endpoint:
    """Parse ``text`` as ``host:port``; raise :class:`ConfigError` naming ``key`` if it is not."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(key, f"expected 'host:port', got {text!r}")
    value = text.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(key, f"expected '[ipv6]:port', got {text!r}")
        if host and not _IPV6_RE.fullmatch(host):
            raise ConfigError(key, f"invalid IPv6 address {host!r} in {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(key, f"missing ':port' in {text!r}")
        if ":" in host:
            raise ConfigError(key, f"IPv6 addresses need brackets, e.g. '[::1]:7601', got {text!r}")
        if host and not _HOST_RE.fullmatch(host):
            raise ConfigError(key, f"invalid host {host!r} in {text!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(key, f"port must be a number in {text!r}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range in {text!r}")
    return Endpoint(host or "0.0.0.0", port)
