"""The directory service: which node holds which chunk key.

- :mod:`.service`: the servicer (Join, Heartbeat, Publish, Withdraw, Locate, Leave,
  ListNodes, Stats, Score) and :class:`~kvpeer.server.directory.service.DirectoryServer`
  (its sweeper, ``/metrics``);
- :mod:`.authz`: who may call what (identity binding, roles, namespace allow-lists);
- :mod:`.store`: the contract every store keeps (epochs, fencing, namespaces, errors);
- :mod:`.memory_store` and :mod:`.redis_store`: the two stores (the Redis one's Lua
  scripts in :mod:`.redis_scripts`);
- :mod:`.stores`: the store a ``--store`` spec names;
- :mod:`.scoring`: Score's key rule and response (the scoring is each store's).

The stores depend on :mod:`.store` only, never on each other.
"""
