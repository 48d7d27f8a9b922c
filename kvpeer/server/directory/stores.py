"""Opens the directory store a ``--store`` spec names (``memory`` or a Redis URL)."""

from __future__ import annotations

from kvpeer.api.errors import ConfigError
from kvpeer.server.directory.memory_store import MemoryStore
from kvpeer.server.directory.store import DirectoryStore


def open_store(spec: str, *, key: str = "store") -> DirectoryStore:
    """The store named by ``spec``: ``memory`` or ``redis://host:port/db``.

    Raises :class:`ConfigError` naming ``key`` for anything else. Redis is
    imported only when asked for.
    """
    if spec == "memory":
        return MemoryStore()
    if spec.startswith(("redis://", "rediss://")):
        from kvpeer.server.directory.redis_store import RedisStore

        return RedisStore(spec, key=key)
    raise ConfigError(key, f"expected 'memory' or 'redis://host:port/db', got {spec!r}")
