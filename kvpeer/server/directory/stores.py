"""Opens the directory store a ``--store`` spec names (``memory``, a Redis or Redis Cluster URL)."""

from __future__ import annotations

from kvpeer.api.errors import ConfigError
from kvpeer.server.directory.memory_store import MemoryStore
from kvpeer.server.directory.store import DirectoryStore


def open_store(spec: str, *, key: str = "store") -> DirectoryStore:
    """The store named by ``spec``: ``memory``, ``redis://host:port/db`` (``rediss://``)
    or ``redis+cluster://host:port,host:port/[?wait=N]``.

    Raises :class:`ConfigError` naming ``key`` for anything else. Redis is
    imported only when asked for.
    """
    if spec == "memory":
        return MemoryStore()
    if spec.startswith(("redis://", "rediss://", "redis+cluster://")):
        from kvpeer.server.directory.redis_store import RedisStore

        return RedisStore(spec, key=key)
    raise ConfigError(
        key,
        f"expected 'memory', 'redis://host:port/db' or "
        f"'redis+cluster://host:port,host:port/', got {spec!r}",
    )
