"""The bounds every kvpeer server enforces and every kvpeer client stays within.

One home for them, so that a client sizing its batches and the server refusing
oversized ones can never disagree.
"""

from __future__ import annotations

#: Largest request message any kvpeer method accepts (a 4,096-key batch is ~160 KiB).
MAX_REQUEST_BYTES = 1 << 20
#: Longest key in bytes (vLLM's OffloadKeys are 20 or 36 bytes).
MAX_KEY_BYTES = 64
#: Most keys one directory Publish, Withdraw or Locate may carry.
MAX_KEYS_PER_CALL = 4096
#: Longest status message (UTF-8 bytes) a kvpeer server sends. Messages quote the
#: caller's input, and gRPC clients refuse trailers beyond 8 to 16 KiB (a status
#: travels percent-encoded: up to 3 bytes per byte), turning the refusal into a
#: confusing RESOURCE_EXHAUSTED about metadata.
MAX_STATUS_DETAILS_BYTES = 2048


def status_details(message: str) -> str:
    """``message`` cut to :data:`MAX_STATUS_DETAILS_BYTES`; servers pass every status through it."""
    encoded = message.encode()
    if len(encoded) <= MAX_STATUS_DETAILS_BYTES:
        return message
    suffix = " ... (truncated)"
    kept = encoded[: MAX_STATUS_DETAILS_BYTES - len(suffix)].decode(errors="ignore")
    return kept + suffix
