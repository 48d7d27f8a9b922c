"""The chunk server every node runs: ``kvpeer.v1.KVPeer``.

- :mod:`.service`: the servicer (Handshake, Lookup, Pull, Release) and
  :class:`~kvpeer.server.peer.service.PeerServer`, which also starts the pull listener;
- :mod:`.chunk_source`: the contract of what the server serves from
  (:class:`~kvpeer.server.peer.chunk_source.ChunkSource`; the tier implements it over
  vLLM's primary tier);
- :mod:`.array_source`: a chunk source over plain arrays (tests, benchmarks);
- :mod:`.leases`: pinned answers that expire.
"""
