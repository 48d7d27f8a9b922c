"""kvpeer's gRPC servers: the peer chunk server, the directory server and its stores."""
