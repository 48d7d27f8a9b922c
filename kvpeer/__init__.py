"""kvpeer: gRPC peer-to-peer and prefill/decode KV-cache exchange for vLLM.

The vLLM integration lives in :mod:`kvpeer.tier` (it imports vLLM); everything
else in this package runs without torch or vLLM. One package per concept, each
saying in its docstring what it may import (``tests/test_layout.py`` checks it):

- :mod:`kvpeer.api`: the shared contract (errors, endpoints, fingerprints, wire, limits, security);
- :mod:`kvpeer.transport`: the zero-copy pull, client and server side;
- :mod:`kvpeer.client`: clients of the chunk server and of the directory;
- :mod:`kvpeer.server`: the chunk server (:mod:`kvpeer.server.peer`) and the
  directory (:mod:`kvpeer.server.directory`);
- :mod:`kvpeer.tier`: the vLLM plugin;
- :mod:`kvpeer.proxy`: the OpenAI-compatible PD proxy;
- :mod:`kvpeer.sim`, :mod:`kvpeer.bench`: simulated vLLM nodes, the demo, benchmarks;
- :mod:`kvpeer.cli`: the ``kvpeer`` command;
- :mod:`kvpeer.v1`: generated protobuf modules (``proto/generate.py``).
"""

__version__ = "0.1.0"

#: Version of the kvpeer wire protocol. Part of every fingerprint and handshake;
#: bump it whenever proto/ changes in a way older nodes cannot read.
PROTOCOL_VERSION = 1

DEFAULT_DIRECTORY_PORT = 7600
DEFAULT_PEER_PORT = 7601
