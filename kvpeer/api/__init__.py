"""The contract every side of kvpeer shares: what is on the wire and what it means.

- :mod:`.errors`: the exception hierarchy (config, wire, peer errors);
- :mod:`.endpoint`: ``host:port`` parsing;
- :mod:`.fingerprint`: the compatibility fingerprint nodes compare;
- :mod:`.wire`: the ``Chunk`` message framing and the chunk digest;
- :mod:`.limits`: the bounds servers enforce and clients respect;
- :mod:`.security`: TLS, mutual TLS and bearer-token settings for servers and clients;
- :mod:`.identity`: how a credential maps to a caller (identity, role);
- :mod:`.cert_reload`: servers reload changed PEM files (rotation without restart).

May import: :mod:`kvpeer` (constants) and the generated :mod:`kvpeer.v1` only.
Everything else in kvpeer may import this package.
"""
