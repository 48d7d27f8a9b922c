"""How chunk bytes travel: the zero-copy ``KVPeer.Pull`` over gRPC/HTTP/2, both ends.

- :mod:`.frames`: HTTP/2 frame and gRPC message framing (encode, parse);
- :mod:`.connection`: the client's HTTP/2 connection to a pull listener;
- :mod:`.pull_client`: a Pull call that reads each row straight into its destination;
- :mod:`.pull_stream`: one Pull's reading of pinned rows, shared by both listeners;
- :mod:`.pull_server`: the pull listener that sends each row with one ``sendmsg``.

The messages are the ordinary ``kvpeer.v1.KVPeer/Pull`` stream (grpcio and grpcurl
read it too); what this package adds is that no user-space copy of a row is made.

May import: :mod:`kvpeer.api` and :mod:`kvpeer.v1`. The chunk server
(:mod:`kvpeer.server.peer`) runs the listener; the client side
(:mod:`kvpeer.client`) runs the reader.
"""
