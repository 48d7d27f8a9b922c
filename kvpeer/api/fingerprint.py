"""Compatibility fingerprints: which nodes may exchange KV chunks.

A fingerprint is a set of named ingredients (model, dtype, block and chunk size,
KV groups, layout, hash algorithm and seed, protocol version, ...) and a digest
over them. Equal digests mean the bytes of a chunk with a given key mean the same
thing on both nodes. The digest is the directory's namespace and is checked by
every handshake and lookup; the ingredients only explain a mismatch to a human.

This module is pure: :mod:`kvpeer.tier.fingerprint` derives the ingredients from
vLLM's ``OffloadingConfig``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kvpeer.api.errors import WireError
from kvpeer.v1 import fingerprint_pb2

_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
MAX_INGREDIENTS = 64
MAX_INGREDIENT_BYTES = 4096

#: What to tell an operator when an ingredient differs. Ingredients without an
#: entry get a generic message naming them.
MISMATCH_HINTS: Mapping[str, str] = MappingProxyType(
    {
        "protocol_version": "upgrade all nodes to the same kvpeer release",
        "inference_engine": "the nodes run different inference engines",
        "model": "the nodes serve different models",
        "dtype": "the KV cache dtypes differ (--dtype / --kv-cache-dtype)",
        "tokens_per_hash": "the block sizes differ: use the same --block-size on all nodes",
        "blocks_per_chunk": "the chunk sizes differ: use the same blocks_per_chunk/block_size "
        "in kv_connector_extra_config",
        "chunk_bytes": "the chunk rows have different sizes (model, dtype, block size or layout)",
        "kv_groups": "the KV cache groups differ (model architecture or --block-size)",
        "hash_algo": "use the same --prefix-caching-hash-algo on all nodes",
        "hash_seed": "set the same PYTHONHASHSEED on all nodes",
        "layout": "set canonical_layout the same way on all nodes",
        "parallelism": "TP differs and canonical_layout is off: turn on canonical_layout "
        "to share chunks across tensor-parallel sizes",
    }
)


def _canonical_json(ingredients: Mapping[str, str]) -> bytes:
    return json.dumps(dict(sorted(ingredients.items())), separators=(",", ":")).encode()


def compute_digest(ingredients: Mapping[str, str]) -> str:
    return hashlib.sha256(_canonical_json(ingredients)).hexdigest()[:32]


@dataclass(frozen=True)
class Fingerprint:
    """Immutable ingredients and their digest."""

    ingredients: Mapping[str, str]
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        frozen = MappingProxyType({str(k): str(v) for k, v in self.ingredients.items()})
        object.__setattr__(self, "ingredients", frozen)
        object.__setattr__(self, "digest", compute_digest(frozen))

    @classmethod
    def of(cls, **ingredients: object) -> Fingerprint:
        return cls({k: str(v) for k, v in ingredients.items()})

    def to_proto(self) -> fingerprint_pb2.Fingerprint:
        return fingerprint_pb2.Fingerprint(digest=self.digest, ingredients=dict(self.ingredients))

    @classmethod
    def from_proto(cls, msg: fingerprint_pb2.Fingerprint) -> Fingerprint:
        """Validate a fingerprint received from the network.

        Raises :class:`WireError` if it is oversized or its digest does not match its
        ingredients (a peer must not be able to claim one digest and show other
        ingredients).
        """
        if len(msg.ingredients) > MAX_INGREDIENTS:
            raise WireError(
                f"fingerprint has {len(msg.ingredients)} ingredients, max {MAX_INGREDIENTS}"
            )
        size = sum(len(k) + len(v) for k, v in msg.ingredients.items())
        if size > MAX_INGREDIENT_BYTES:
            raise WireError(
                f"fingerprint ingredients take {size} bytes, max {MAX_INGREDIENT_BYTES}"
            )
        fp = cls(dict(msg.ingredients))
        if msg.digest != fp.digest:
            raise WireError(
                f"fingerprint digest {msg.digest[:80]!r} does not match its ingredients "
                f"({fp.digest})"
            )
        return fp

    def mismatch(self, other: Fingerprint) -> str | None:
        """None when compatible; else a message naming each ingredient that differs.

        Phrased from this node's point of view: ``ours`` is ``self``.
        """
        if self.digest == other.digest:
            return None
        reasons = []
        for name in sorted(set(self.ingredients) | set(other.ingredients)):
            ours = self.ingredients.get(name, "<absent>")
            theirs = other.ingredients.get(name, "<absent>")
            if ours != theirs:
                hint = MISMATCH_HINTS.get(name, "the nodes are configured differently")
                reasons.append(
                    f"{name.replace('_', ' ')} differs (ours {ours}, theirs {theirs}): {hint}"
                )
        return "; ".join(reasons)

    def describe(self) -> str:
        """Multi-line, human-readable: the digest, then one ingredient per line."""
        width = max((len(k) for k in self.ingredients), default=0)
        lines = [f"fingerprint {self.digest}"]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in sorted(self.ingredients.items())]
        return "\n".join(lines)


def is_digest(text: str) -> bool:
    """Whether ``text`` has the form of a fingerprint digest (32 lower-case hex digits)."""
    return bool(_DIGEST_RE.fullmatch(text))
