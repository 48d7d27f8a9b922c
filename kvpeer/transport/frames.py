"""HTTP/2 and gRPC-over-HTTP/2 constants and framing helpers shared by both ends of a Pull.

:mod:`kvpeer.transport.connection` (the pull client) and :mod:`kvpeer.transport.pull_server` (the
fast Pull listener) speak the same small part of RFC 9113 and of gRPC's HTTP/2
mapping (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md); the
numbers, the frame layout and gRPC's header encodings live here once.

Why hand-written, not the ``h2`` library (python-hyper; issue 14): ``h2`` is a
sans-I/O state machine that takes received bytes and hands back ``bytes`` to
send, so every row is copied in user space on both ends, where this transport
``recv_into``s each row into its destination and sends it with one ``sendmsg``
from the pinned row. Measured (``benchmarks/h2_library.py --chunks 128
--chunk-mib 2 --repeat 5``, 2-core CPU machine, loopback, same pull listener,
1 stream, digests checked): kvpeer's client 2.26 GB/s at 0.20 client CPU-s/GB,
an ``h2`` client 0.38 GB/s at 2.05 CPU-s/GB: ``h2`` costs 83% of the pull
throughput (17% of kvpeer's, paired) and 10x the client CPU; its best settings
tried (frames of 16 KiB to 16 MiB, receive buffers of 64 KiB to 4 MiB) stayed at
7-33%. On the sending side ``send_data`` + ``data_to_send`` + ``sendall`` of
2 MiB rows over a socketpair ran at 1.53 GB/s and 0.63 CPU-s/GB against 4.75 GB/s
and 0.18 CPU-s/GB for one ``sendmsg`` of a memoryview (3.1x slower). HPACK,
where no row bytes pass, does use the library (``hpack``).
"""

from __future__ import annotations

import re
import struct
import urllib.parse

#: The one method both ends of a fast Pull speak.
PULL_PATH = "/kvpeer.v1.KVPeer/Pull"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
#: gRPC's length prefix of a message: a compressed flag and a 4-byte length.
GRPC_PREFIX_BYTES = 5

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9

# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings (section 6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 1, 2, 3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 4, 5, 6

# Error codes (section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11
ERROR_NAMES = (
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
)

#: Windows and frame sizes every connection starts with, and their limits.
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = (1 << 31) - 1
MAX_FRAME = (1 << 24) - 1
LAST_STREAM_ID = (1 << 31) - 1

UINT32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")

#: grpc-timeout: at most 8 digits and a unit (hours down to nanoseconds).
_MAX_TIMEOUT_DIGITS = 99_999_999
_TIMEOUT_RE = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
#: grpc-message: everything outside printable ASCII, and '%', is percent-encoded.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("%"))


def frame_header(length: int, kind: int, flags: int, stream: int) -> bytes:
    """The 9 bytes before a frame's payload: 24-bit length, type, flags, 31-bit stream id."""
    return UINT32.pack(length)[1:] + bytes((kind, flags)) + UINT32.pack(stream)


def frame(kind: int, flags: int, stream: int, payload: bytes | memoryview = b"") -> bytes:
    """One whole frame."""
    return frame_header(len(payload), kind, flags, stream) + payload


def settings_payload(settings: dict[int, int]) -> bytes:
    """The payload of a SETTINGS frame carrying ``settings`` (id -> value)."""
    return b"".join(_SETTING.pack(key, value) for key, value in settings.items())


def iter_settings(payload: bytes | memoryview):
    """(id, value) pairs of a SETTINGS payload whose length is a multiple of 6."""
    for offset in range(0, len(payload), _SETTING.size):
        yield _SETTING.unpack_from(payload, offset)


def error_name(code: int) -> str:
    """The name of an HTTP/2 error code (``error 42`` for codes RFC 9113 does not name)."""
    return ERROR_NAMES[code] if 0 <= code < len(ERROR_NAMES) else f"error {code}"


def encode_grpc_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value for ``seconds`` (milliseconds, or seconds when too long)."""
    millis = max(1, round(seconds * 1000))
    if millis <= _MAX_TIMEOUT_DIGITS:
        return f"{millis}m"
    return f"{min(_MAX_TIMEOUT_DIGITS, round(seconds))}S"


def parse_grpc_timeout(value: str) -> float:
    """Seconds of a ``grpc-timeout`` value; raises ValueError when it is malformed."""
    match = _TIMEOUT_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"grpc-timeout {value[:32]!r} is not 1-8 digits and a unit of H M S m u n")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def encode_grpc_message(message: str) -> str:
    """``grpc-message``'s form of a status message: UTF-8, percent-encoded outside printable ASCII."""
    return urllib.parse.quote(message, safe=_MESSAGE_SAFE)


def decode_grpc_message(value: str) -> str:
    """The status message a ``grpc-message`` value carries."""
    return urllib.parse.unquote(value)
