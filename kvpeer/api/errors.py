"""Exceptions that kvpeer raises to its callers.

Each carries a message meant for the operator: it names the key, peer or field
at fault and, where there is one, the fix.
"""


class KVPeerError(Exception):
    """Base class of every kvpeer error."""


class ConfigError(KVPeerError, ValueError):
    """A configuration value is missing, unknown or invalid.

    The message starts with the offending key, e.g. ``tls.ca: cannot read ...``.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class IncompatiblePeerError(KVPeerError):
    """A peer's protocol version, chunk size or fingerprint differs from ours."""


class PeerUnavailableError(KVPeerError):
    """A peer or the directory could not be reached, or did not answer in time."""


class WireError(KVPeerError):
    """Bytes received from the network do not form a valid kvpeer message."""
