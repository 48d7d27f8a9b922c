"""Talking to kvpeer servers: the peer chunk server and the directory.

- :mod:`.peer`: :class:`~kvpeer.client.peer.PeerClient` (handshake, leased lookups,
  verified pulls into destination rows) and a pool of them;
- :mod:`.directory`: :class:`~kvpeer.client.directory.DirectoryClient` (join,
  heartbeats, batched publishing in the background, batched locates);
- :mod:`.replicas`: the directory replicas a client may call, their health, failover;
- :mod:`.location`: Locate's answer and the holder of a prompt's longest run;
- :mod:`.score`: :class:`~kvpeer.client.score.ScoreClient`, Directory.Score for routers.

May import: :mod:`kvpeer.api`, :mod:`kvpeer.transport` and :mod:`kvpeer.v1`;
never a server or the tier. The tier, the proxy and the tools use it.
"""
