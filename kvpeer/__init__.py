"""kvpeer: gRPC peer-to-peer and prefill/decode KV-cache exchange for vLLM.

The vLLM integration lives in :mod:`kvpeer.tier` (it imports vLLM); everything
else in this package runs without torch or vLLM.
"""

__version__ = "0.1.0"

#: Version of the kvpeer wire protocol. Part of every fingerprint and handshake;
#: bump it whenever proto/ changes in a way older nodes cannot read.
PROTOCOL_VERSION = 1

DEFAULT_DIRECTORY_PORT = 7600
DEFAULT_PEER_PORT = 7601
