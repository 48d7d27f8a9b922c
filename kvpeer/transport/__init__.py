"""How chunk bytes travel: the zero-copy ``KVPeer.Pull`` over gRPC/HTTP/2, both ends.

- :mod:`.frames`: HTTP/2 frame and gRPC message framing (encode, parse);
- client side: :mod:`.connection` (the client's HTTP/2 connection to a pull listener),
  :mod:`.call_status` (how a call ends, named as grpc names it: ``CallError``),
  :mod:`.pull_client` (a Pull call that reads each row straight into its destination);
- server side: :mod:`.pull_server` (the listener: bind, accept, stop),
  :mod:`.server_connection` (one connection's life and calls, sending rows),
  :mod:`.server_frames` (what a connection receives), :mod:`.server_send` (what
  it writes: the outbox, one ``sendmsg`` per frame);
- :mod:`.pull_stream`: one Pull's reading of pinned rows, shared by both listeners.

The messages are the ordinary ``kvpeer.v1.KVPeer/Pull`` stream (grpcio and grpcurl
read it too); what this package adds is that no user-space copy of a row is made.

May import: :mod:`kvpeer.api` and :mod:`kvpeer.v1`. The chunk server
(:mod:`kvpeer.server.peer`) runs the listener; the client side
(:mod:`kvpeer.client`) runs the reader.
"""
