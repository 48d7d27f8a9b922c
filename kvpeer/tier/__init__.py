"""kvpeer's vLLM integration: the PeerSecondaryTier secondary tier (imports vLLM).

vLLM loads it with ``{"type": "PeerSecondaryTier", "module_path": "kvpeer.tier", ...}``
(``getattr(module, "PeerSecondaryTier")``). The class is imported on first access,
so that importing a submodule (``kvpeer.tier.params``, ``kvpeer.tier.fingerprint``)
does not start the whole tier's imports.
"""

from typing import Any

__all__ = ["PeerSecondaryTier"]


def __getattr__(name: str) -> Any:
    if name == "PeerSecondaryTier":
        from kvpeer.tier.tier import PeerSecondaryTier

        return PeerSecondaryTier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
