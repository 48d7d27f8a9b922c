"""The tier's compatibility fingerprint, derived from vLLM's own objects.

Two nodes may exchange a chunk only when its key names the same tokens and its
bytes mean the same thing on both. This module names every ingredient of that
promise, following how vLLM's built-in tiers name their storage namespace
(``FileMapper.from_offloading_spec(..., parallel_agnostic=True)``, which the p2p
tier hashes into its ``config_fingerprint``), and adds what vLLM's p2p tier
checks separately (row size, hash seed) or not at all (hash algorithm):

===================  ==========================================================
``protocol_version`` :data:`kvpeer.PROTOCOL_VERSION`
``inference_engine`` ``vllm`` (FileMapper's ``inference_engine``)
``model``            ``config.model.name``
``dtype``            ``config.model.dtype`` (the KV cache dtype)
``tokens_per_hash``  ``config.cache.tokens_per_hash``
``blocks_per_chunk`` ``offloading_spec.blocks_per_chunk``
``kv_groups``        per offloaded group: id, tokens per block, layer count and a
                     short hash of the layer names
``chunk_bytes``      the primary row stride (``primary_kv_view.strides[0]``)
``layout``           ``canonical v1-hnd`` (vLLM's ``canonical_format_id``) or
                     ``direct LBHNC``; `` replicated`` for the MLA single copy
``parallelism``      ``agnostic``, or ``tp=.. pp=.. pcp=.. dcp=..``
``hash_algo``        the prefix-caching hash algorithm
``hash_seed``        the NONE_HASH seed: ``vllm-none-hash`` (vLLM's default) or
                     a sha256 prefix of the seed, never the seed itself
===================  ==========================================================

Parallelism is left out only when the bytes of a chunk are the same under any
TP: the canonical layout with vLLM's ``is_parallelism_agnostic`` (certified per
layer by the worker, which fails closed), or the MLA ``replicated_layout``.
Unlike ``FileMapper``, the *direct* layout always names its parallelism, even when
vLLM calls it agnostic: rank-order concatenation of worker pages differs from
the TP=1 row as soon as a model has two layers (see ``tests/test_tier_fingerprint``
and the contract, section 2).

When the hash algorithm and seed are known
------------------------------------------
A secondary tier is built inside ``Scheduler.__init__`` (``OffloadingConnector``
-> ``OffloadingSpecFactory.create_spec`` -> ``TieringOffloadingSpec.get_manager``).
At that moment, in vLLM 0.33.0:

- the algorithm is not reachable: ``OffloadingConfig`` has no hash field, the tier
  receives no ``VllmConfig``, and ``get_current_vllm_config()`` is unset in the
  engine-core process (only workers and model runners enter
  ``set_current_vllm_config``);
- the seed is not resolved: ``EngineCore.__init__`` calls
  ``init_none_hash(get_hash_fn_by_name(cache_config.prefix_caching_hash_algo))``
  right *after* building the scheduler (``v1/engine/core.py`` 219-230), and until
  then ``get_none_hash_seed()`` returns ``"vllm-none-hash"`` whatever
  ``PYTHONHASHSEED`` says. vLLM's p2p tier resolves its seed lazily for this reason.

After ``init_none_hash`` both are exact: the seed is ``get_none_hash_seed()`` and
the algorithm is the one whose hash of that seed equals ``NONE_HASH``
(:func:`engine_hash_identity`). So the tier should derive its fingerprint once
:func:`engine_hash_identity` is not None (before the first request, since the
engine finishes its constructor before serving), e.g. on its own background
thread (:func:`await_engine_hash_identity`) before it joins the directory or
answers handshakes. Outside an engine (tests, tools), or when called earlier,
:func:`tier_fingerprint` applies vLLM's documented defaults
(:func:`assumed_hash_identity`: sha256, then PYTHONHASHSEED or "vllm-none-hash"),
which is exact for the default algorithm and for any algorithm under
PYTHONHASHSEED, and wrong only in the label of a non-default algorithm and in
calling an xxhash node without PYTHONHASHSEED shareable. Neither can move wrong
bytes: keys of different algorithms or seeds never collide, they only miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.fingerprint import Fingerprint

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.config import OffloadingConfig

#: vLLM 0.33.0's ``--prefix-caching-hash-algo`` choices (``utils/hashing.py``).
HASH_ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
#: ``CacheConfig.prefix_caching_hash_algo``'s default (``config/cache.py:259``).
DEFAULT_HASH_ALGO = "sha256"
#: Algorithms whose seed vLLM draws at random per process unless PYTHONHASHSEED is set.
RANDOM_SEED_HASH_ALGORITHMS = frozenset({"xxhash", "xxhash_cbor"})
#: vLLM's seed when PYTHONHASHSEED is unset and the algorithm is cryptographic.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"

_SHORT_HASH_CHARS = 12
#: Stands in for a random seed not drawn yet, so this process's fingerprint is stable.
_PROCESS_TOKEN = secrets.token_hex(_SHORT_HASH_CHARS // 2)


@dataclass(frozen=True)
class HashIdentity:
    """How this process hashes token blocks into keys.

    ``seed`` is None only when it is random per process and not drawn yet (an
    assumption made before vLLM's ``init_none_hash``); ``random_seed`` is True
    whenever no other process can have the same seed.
    """

    algo: str
    seed: str | None
    random_seed: bool
    #: True when read from the engine's initialised NONE_HASH, False when assumed.
    from_engine: bool

    def __post_init__(self) -> None:
        if self.seed is None and not self.random_seed:
            raise ValueError("only a random per-process seed may be unknown")

    def seed_ingredient(self) -> str:
        """The seed as a fingerprint shows it: never a random seed in clear."""
        if self.seed is None or self.random_seed:
            token = _PROCESS_TOKEN if self.seed is None else _short_hash(self.seed)
            return f"random-per-process {token}"
        if self.seed == DEFAULT_NONE_HASH_SEED:
            return DEFAULT_NONE_HASH_SEED
        return f"sha256:{_short_hash(self.seed)}"


@dataclass(frozen=True)
class TierFingerprint:
    """The tier's fingerprint and whether any other node can share it."""

    fingerprint: Fingerprint
    #: False when the hash seed cannot match any other node's.
    shareable: bool
    #: One clear start-up warning when not shareable.
    warning: str | None
    hash_identity: HashIdentity


def engine_hash_identity() -> HashIdentity | None:
    """The algorithm and seed vLLM's engine keys blocks with in this process.

    None until ``EngineCore`` has called ``init_none_hash`` (just after it built
    the scheduler and this tier), or if ``NONE_HASH`` matches no known algorithm.
    Cheap (four hashes of a short string); safe from any thread.
    """
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    none_hash = getattr(kv_cache_utils, "NONE_HASH", None)
    if none_hash is None:
        return None
    seed = kv_cache_utils.get_none_hash_seed()
    for algo in HASH_ALGORITHMS:
        try:
            matches = get_hash_fn_by_name(algo)(seed) == none_hash
        except ModuleNotFoundError:  # xxhash not installed: the engine did not use it
            continue
        if matches:
            return HashIdentity(
                algo=algo,
                seed=seed,
                random_seed=_seed_is_random(algo),
                from_engine=True,
            )
    return None


def await_engine_hash_identity(
    timeout_s: float, *, poll_interval_s: float = 0.005
) -> HashIdentity | None:
    """Wait until :func:`engine_hash_identity` answers; None after ``timeout_s``.

    vLLM offers no hook for "init_none_hash has run", so this polls. Call it from
    a tier's own background thread, never from a method vLLM calls under its lock.
    Inside an engine it returns within milliseconds of the tier's construction.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        identity = engine_hash_identity()
        remaining = deadline - time.monotonic()
        if identity is not None or remaining <= 0:
            return identity
        time.sleep(min(poll_interval_s, remaining))


def assumed_hash_identity(algo: str = DEFAULT_HASH_ALGO) -> HashIdentity:
    """vLLM's seed rule (``resolve_none_hash_seed``) for ``algo``, without an engine.

    PYTHONHASHSEED when set; else ``"vllm-none-hash"`` for sha256/sha256_cbor;
    else (xxhash, xxhash_cbor) a random seed per process, unknown here.
    """
    if algo not in HASH_ALGORITHMS:
        raise ValueError(
            f"unknown prefix-caching hash algorithm {algo!r}; known: {HASH_ALGORITHMS}"
        )
    random_seed = _seed_is_random(algo)
    if random_seed:
        seed = None
    else:
        seed = os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
    return HashIdentity(algo=algo, seed=seed, random_seed=random_seed, from_engine=False)


def tier_fingerprint(
    offloading_spec: OffloadingSpec,
    chunk_bytes: int,
    *,
    hash_identity: HashIdentity | None = None,
) -> TierFingerprint:
    """Derive this node's fingerprint from its ``OffloadingSpec`` and primary row size.

    Args:
        offloading_spec: the spec vLLM passed to the tier's constructor.
        chunk_bytes: the primary tier's row stride, ``primary_kv_view.strides[0]``.
        hash_identity: how keys are hashed; by default :func:`engine_hash_identity`,
            falling back to :func:`assumed_hash_identity` outside an engine.

    Pure apart from reading vLLM's hash state; call it from any thread.
    """
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    identity = hash_identity or engine_hash_identity() or assumed_hash_identity()
    config = offloading_spec.config
    fingerprint = Fingerprint.of(
        protocol_version=PROTOCOL_VERSION,
        inference_engine="vllm",
        model=config.model.name,
        dtype=config.model.dtype,
        tokens_per_hash=config.cache.tokens_per_hash,
        blocks_per_chunk=offloading_spec.blocks_per_chunk,
        kv_groups=_kv_groups(config),
        chunk_bytes=chunk_bytes,
        layout=_layout(config),
        parallelism=_parallelism(config),
        hash_algo=identity.algo,
        hash_seed=identity.seed_ingredient(),
    )
    warning = None
    if identity.random_seed:
        warning = (
            f"kvpeer: prefix-caching hash {identity.algo} uses a random per-process seed "
            "because PYTHONHASHSEED is not set, so this node's block hashes match no other "
            "node's and it will neither serve nor fetch KV chunks. Set the same "
            "PYTHONHASHSEED on all nodes, or use --prefix-caching-hash-algo sha256."
        )
    return TierFingerprint(
        fingerprint=fingerprint,
        shareable=not identity.random_seed,
        warning=warning,
        hash_identity=identity,
    )


def _seed_is_random(algo: str) -> bool:
    return algo in RANDOM_SEED_HASH_ALGORITHMS and os.environ.get("PYTHONHASHSEED") is None


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_SHORT_HASH_CHARS]


def _kv_groups(config: OffloadingConfig) -> str:
    """Bounded and readable: the layer names go in as a hash, not in full."""
    return ";".join(
        f"g{group.group_id}:{group.tokens_per_block}tok:{len(group.layer_names)}layers:"
        f"{_short_hash(json.dumps(list(group.layer_names)))}"
        for group in config.groups
    )


def _layout(config: OffloadingConfig) -> str:
    if config.canonical_layout:
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.canonical_mapping import (
            canonical_format_id,
        )

        if config.kv_cache_layout is None:  # vLLM always sets it; FileMapper asserts the same
            raise ValueError("canonical_layout is on but OffloadingConfig.kv_cache_layout is unset")
        layout = f"canonical {canonical_format_id(config.kv_cache_layout)}"
    else:
        layout = f"direct {config.kv_cache_layout}"
    return f"{layout} replicated" if config.replicated_layout else layout


def _parallelism(config: OffloadingConfig) -> str:
    agnostic = (
        config.canonical_layout and config.parallel.is_parallelism_agnostic
    ) or config.replicated_layout
    if agnostic:
        return "agnostic"
    p = config.parallel
    return f"tp={p.tp_size} pp={p.pp_size} pcp={p.pcp_size} dcp={p.dcp_size}"
