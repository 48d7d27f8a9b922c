"""Chunk keys from token ids, computed exactly as vLLM and the tier compute them, without vLLM.

vLLM 0.33's prefix cache hashes a request's tokens block by block
(``vllm.v1.core.kv_cache_utils.hash_block_tokens``)::

    hash[i] = H((hash[i-1] or NONE_HASH, tuple(tokens of block i), extra_keys[i]))
    NONE_HASH = H(seed)

where ``H`` is ``--prefix-caching-hash-algo`` (``vllm.utils.hashing``): ``sha256``
(SHA-256 of ``pickle.dumps(..., HIGHEST_PROTOCOL)``, the default), ``sha256_cbor``
(SHA-256 of canonical CBOR, ``cbor2.dumps(..., canonical=True)``), ``xxhash`` and
``xxhash_cbor`` (xxh3-128 of the same serialisations). ``seed`` is ``PYTHONHASHSEED``
when set, else ``"vllm-none-hash"`` for the sha256 algorithms; the xxhash ones use a
random per-process seed unless ``PYTHONHASHSEED`` is set, so a router can only match
them when the nodes set ``PYTHONHASHSEED`` and the router is given the same seed.

``extra_keys[i]`` is None unless the request has a LoRA adapter
(``("lora", name, path)`` on every block) or a ``cache_salt``
(``("cache_salt", salt)`` on block 0 only), in that order. Multimodal inputs and
prompt embeddings also add extra keys; they are not supported here (their hashes
need the media / tensors).

The offloading connector keys a chunk of ``hashes_per_chunk`` hashes
(``block_size * blocks_per_chunk // hash_block_size``) with the hash of its last
block plus the 4-byte big-endian KV-cache group index (``make_offload_key``): the
keys the tier publishes to the directory. Only full chunks have keys.

:class:`KeySpec` holds the settings (they must equal the nodes'), and
:func:`request_tokens` reads token ids from an OpenAI request body. Both run
without torch or vLLM (the proxy and ``kvpeer keys`` use them);
``tests/test_keys.py`` checks them against vLLM's own functions and the tier.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from kvpeer.api.errors import ConfigError

#: The algorithms of vLLM's ``--prefix-caching-hash-algo``.
HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
#: vLLM's NONE_HASH seed for the sha256 algorithms when PYTHONHASHSEED is not set.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_CRYPTOGRAPHIC = ("sha256", "sha256_cbor")


def _pickled(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(value: Any) -> bytes:
    import cbor2  # what vLLM uses; imported only for the cbor algorithms

    return cbor2.dumps(value, canonical=True)


def _xxh3_128(data: bytes) -> bytes:
    try:
        import xxhash
    except ImportError as exc:  # pragma: no cover - a kvpeer dependency
        raise ConfigError("hash_algo", "the xxhash algorithms need `pip install xxhash`") from exc
    return xxhash.xxh3_128_digest(data)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_ALGORITHMS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], bytes]]] = {
    "sha256": (_pickled, _sha256),
    "sha256_cbor": (_cbor, _sha256),
    "xxhash": (_pickled, _xxh3_128),
    "xxhash_cbor": (_cbor, _xxh3_128),
}


def hash_function(algo: str, *, key: str = "hash_algo") -> Callable[[Any], bytes]:
    """vLLM's hash function named ``algo`` (``vllm.utils.hashing.get_hash_fn_by_name``).

    Raises :class:`ConfigError` naming ``key`` for any other name.
    """
    try:
        serialise, digest = _ALGORITHMS[algo]
    except KeyError:
        raise ConfigError(
            key, f"unsupported hash algorithm {algo!r}: use one of {', '.join(HASH_ALGOS)}"
        ) from None

    def hash_fn(value: Any) -> bytes:
        return digest(serialise(value))

    hash_fn.__name__ = algo
    return hash_fn


def resolve_seed(algo: str, seed: str | None = None, *, key: str = "seed") -> str:
    """The NONE_HASH seed the nodes use: ``seed``, else PYTHONHASHSEED, else vLLM's default.

    The xxhash algorithms have no default (vLLM draws a random seed per process):
    without ``seed`` or PYTHONHASHSEED they raise :class:`ConfigError` naming ``key``.
    """
    if seed is not None:
        return seed
    env = os.environ.get("PYTHONHASHSEED")
    if env is not None:
        return env
    if algo in _CRYPTOGRAPHIC:
        return DEFAULT_NONE_HASH_SEED
    raise ConfigError(
        key,
        f"{algo} nodes use a random NONE_HASH seed unless PYTHONHASHSEED is set: set it on "
        "the nodes and give the router the same seed",
    )


class HashCache:
    """Block hashes already computed. Not thread-safe; one per KeySpec (it does not record one).

    Requests sharing a prefix share its hashes, so a router hashes a system prompt
    once and afterwards pays one dict lookup per block, keyed by exactly what vLLM
    hashes, ``(parent hash, block tokens, extra keys)`` (~0.3 us a block, against
    ~1.3 us to serialise and digest it). Keys and values are tuples of ints and
    bytes, which the garbage collector does not track, so a full cache costs a
    collection nothing (a trie of dicts was 30% faster to walk but made each full
    collection take 120 ms at 256k blocks). Bounded: past ``max_entries`` blocks
    it starts again empty (cheap, and hot prefixes come back at once).
    """

    def __init__(self, max_entries: int = 1 << 18) -> None:
        self.max_entries = max_entries
        #: ``(parent, block, extra keys)`` -> ``(block hash, chunk key)``.
        self.entries: dict[tuple[bytes, tuple[int, ...], Any], tuple[bytes, bytes]] = {}


@dataclass(frozen=True)
class KeySpec:
    """The settings chunk keys depend on; they must equal the nodes' for keys to match.

    Args:
        block_size: vLLM's ``--block-size`` (tokens per GPU block).
        blocks_per_chunk: blocks per offloaded chunk (the tier's chunk; default 1).
        hash_algo: ``--prefix-caching-hash-algo``.
        seed: NONE_HASH seed; None resolves it as :func:`resolve_seed` does.
        hash_block_size: tokens per hash (vLLM's ``hash_block_size``); None: ``block_size``.
        group_idx: the KV-cache group whose keys to compute (0 for one-group models).
    """

    block_size: int
    blocks_per_chunk: int = 1
    hash_algo: str = "sha256"
    seed: str | None = None
    hash_block_size: int | None = None
    group_idx: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "blocks_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"expected a positive integer, got {value!r}")
        hash_block = self.hash_block_size or self.block_size
        if isinstance(hash_block, bool) or not isinstance(hash_block, int) or hash_block < 1:
            raise ConfigError("hash_block_size", f"expected a positive integer, got {hash_block}")
        if (self.block_size * self.blocks_per_chunk) % hash_block:
            raise ConfigError(
                "hash_block_size",
                f"a chunk of {self.block_size * self.blocks_per_chunk} tokens is not a whole "
                f"number of {hash_block}-token hash blocks",
            )
        if not 0 <= self.group_idx < 1 << 32:
            raise ConfigError("group_idx", f"expected 0 to 2**32-1, got {self.group_idx}")
        hash_function(self.hash_algo)  # raises for an unknown algorithm
        object.__setattr__(self, "seed", resolve_seed(self.hash_algo, self.seed))
        object.__setattr__(self, "hash_block_size", hash_block)
        serialise, digest = _ALGORITHMS[self.hash_algo]
        object.__setattr__(self, "_serialise", serialise)
        object.__setattr__(self, "_digest", digest)
        object.__setattr__(self, "_none_hash", digest(serialise(self.seed)))
        object.__setattr__(self, "_group", self.group_idx.to_bytes(4, "big"))

    @property
    def tokens_per_chunk(self) -> int:
        return self.block_size * self.blocks_per_chunk

    @property
    def hashes_per_chunk(self) -> int:
        return self.tokens_per_chunk // self.hash_block_size  # type: ignore[operator]

    @property
    def none_hash(self) -> bytes:
        """vLLM's NONE_HASH for these settings: the parent of the first block."""
        return self._none_hash  # type: ignore[attr-defined,no-any-return]

    def block_hashes(
        self,
        tokens: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: tuple[str, str] | None = None,
        max_blocks: int | None = None,
        cache: HashCache | None = None,
    ) -> list[bytes]:
        """vLLM's chained hashes of every full hash block of ``tokens`` (at most ``max_blocks``).

        ``cache_salt`` is the request's ``cache_salt``; ``lora`` its adapter's
        ``(lora_name, lora_path)``; ``cache`` remembers hashes across calls (one
        cache per KeySpec: it does not record the settings).
        """
        if cache is None:
            return self._chain(tokens, cache_salt, lora, max_blocks)
        return [entry[0] for entry in self._walk(tokens, cache_salt, lora, max_blocks, cache)]

    def chunk_keys(
        self,
        tokens: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: tuple[str, str] | None = None,
        max_keys: int | None = None,
        cache: HashCache | None = None,
    ) -> list[bytes]:
        """The OffloadKeys of the full chunks of ``tokens`` in order (at most ``max_keys``):
        what the tier publishes, and what Directory.Score takes."""
        per_chunk = self.hashes_per_chunk
        max_blocks = None if max_keys is None else max_keys * per_chunk
        if cache is None:
            group = self._group  # type: ignore[attr-defined]
            hashes = self._chain(tokens, cache_salt, lora, max_blocks)
            return [h + group for h in hashes[per_chunk - 1 :: per_chunk]]
        entries = self._walk(tokens, cache_salt, lora, max_blocks, cache)
        return [entry[1] for entry in entries[per_chunk - 1 :: per_chunk]]

    def _setup(
        self,
        tokens: Sequence[int],
        cache_salt: str | None,
        lora: tuple[str, str] | None,
        max_blocks: int | None,
    ) -> tuple[int, Any, Any]:
        """The number of full hash blocks, block 0's and the other blocks' extra keys."""
        count = len(tokens) // self.hash_block_size  # type: ignore[operator]
        if max_blocks is not None:
            count = min(count, max_blocks)
        lora_keys = [("lora", lora[0], lora[1])] if lora else []
        every = tuple(lora_keys) or None
        first = tuple(lora_keys + ([("cache_salt", cache_salt)] if cache_salt else [])) or None
        return count, first, every

    def _chain(
        self,
        tokens: Sequence[int],
        cache_salt: str | None,
        lora: tuple[str, str] | None,
        max_blocks: int | None,
    ) -> list[bytes]:
        """The chained hashes, each computed (no cache)."""
        count, first, every = self._setup(tokens, cache_salt, lora, max_blocks)
        size: int = self.hash_block_size  # type: ignore[assignment]
        serialise, digest = self._serialise, self._digest  # type: ignore[attr-defined]
        parent = self._none_hash  # type: ignore[attr-defined]
        out = []
        extra = first
        for block in _blocks(tokens, size, count):
            parent = digest(serialise((parent, block, extra)))
            extra = every
            out.append(parent)
        return out

    def _walk(
        self,
        tokens: Sequence[int],
        cache_salt: str | None,
        lora: tuple[str, str] | None,
        max_blocks: int | None,
        cache: HashCache,
    ) -> list[tuple[bytes, bytes]]:
        """``(block hash, chunk key)`` of each full hash block, through ``cache``."""
        count, first, every = self._setup(tokens, cache_salt, lora, max_blocks)
        size: int = self.hash_block_size  # type: ignore[assignment]
        serialise, digest = self._serialise, self._digest  # type: ignore[attr-defined]
        group = self._group  # type: ignore[attr-defined]
        entries = cache.entries
        if len(entries) + count > cache.max_entries:
            entries.clear()
        get = entries.get
        parent = self._none_hash  # type: ignore[attr-defined]
        extra = first
        out: list[tuple[bytes, bytes]] = []
        append = out.append
        for block in _blocks(tokens, size, count):
            item = (parent, block, extra)
            entry = get(item)
            if entry is None:
                parent = digest(serialise(item))
                entry = entries[item] = (parent, parent + group)
            else:
                parent = entry[0]
            extra = every
            append(entry)
        return out


def _blocks(tokens: Sequence[int], size: int, count: int) -> Iterator[tuple[int, ...]]:
    """The first ``count`` blocks of ``size`` tokens, as tuples made at C speed."""
    return islice(zip(*[iter(tokens)] * size, strict=False), count)


def _token_list(value: Any) -> list[int] | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return value
    return None


def _token_list_ends(value: Any) -> list[int] | None:
    if (
        isinstance(value, list)
        and value
        and type(value[0]) is int
        and type(value[-1]) is int
        and value[0] >= 0
        and value[-1] >= 0
    ):
        return value
    return None


def request_tokens(body: Mapping[str, Any], *, strict: bool = True) -> list[int] | None:
    """The token ids of an OpenAI request body, or None when it has none (text, chat).

    Accepted: ``prompt_token_ids`` (a list of ints), a completions ``prompt`` that
    is a list of token ids, or a list of such lists (a batch: the first prompt).
    Text prompts and chat ``messages`` need a tokenizer: None.

    ``strict`` checks every token is a non-negative int (~80 ns a token). A router
    passes ``strict=False`` (only the first and last are checked): its keys only
    steer a request, vLLM refuses bad token ids itself, and a prompt of 65,536
    tokens would otherwise spend 5 ms here.
    """
    check = _token_list if strict else _token_list_ends
    tokens = check(body.get("prompt_token_ids"))
    if tokens is not None:
        return tokens
    prompt = body.get("prompt")
    tokens = check(prompt)
    if tokens is None and isinstance(prompt, list) and prompt:
        tokens = check(prompt[0])
    return tokens


def request_cache_salt(body: Mapping[str, Any]) -> str | None:
    """The body's ``cache_salt`` when it is a non-empty string (vLLM's own rule), else None."""
    salt = body.get("cache_salt")
    return salt if isinstance(salt, str) and salt else None
