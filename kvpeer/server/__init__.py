"""kvpeer's gRPC servers.

- :mod:`.grpc_server`: how every kvpeer gRPC server runs (TLS, token, health,
  reflection, limits);
- :mod:`.peer`: the chunk server (``kvpeer.v1.KVPeer``): handshakes, leased
  lookups, Pull from pinned rows;
- :mod:`.directory`: the directory service (``kvpeer.v1.Directory``) and its stores.

May import: :mod:`kvpeer.api`, :mod:`kvpeer.transport` (the pull listener) and
:mod:`kvpeer.v1`; never the tier or the client side. The two services do not
import each other.
"""
