"""The tier fingerprint from real vLLM specs, and canonical chunk bytes across TP on the CPU.

Specs are vLLM's own ``TieringOffloadingSpec`` objects (tests/support/fingerprints.py);
canonical rows come from vLLM's own mapping derivation and copy plans
(kvpeer/sim/canonical.py), checked against an independent oracle: the canonical
page of a layer is the whole (TP=1) page.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
import torch

from kvpeer.sim.canonical import (
    KVGeometry,
    canonical_chunk_row,
    direct_chunk_row,
    gpu_pages_from_canonical_row,
    random_kv_cache,
    rank_kv_cache,
)
from kvpeer.sim.vllm_config import TINY, ModelShape
from kvpeer.tier.fingerprint import (
    HashIdentity,
    assumed_hash_identity,
    await_engine_hash_identity,
    engine_hash_identity,
    tier_fingerprint,
)
from tests.support.fingerprints import sim_spec, sim_tier_fingerprint

#: 8 GQA heads in bf16: splits over TP 1, 2, 4 and 8.
GQA8 = ModelShape("kvpeer/gqa8-test-model", 3, 8, 16, "bfloat16")


def differing(ours, theirs) -> list[str]:
    """Names of the ingredients ``Fingerprint.mismatch`` reports, as it spells them."""
    message = ours.fingerprint.mismatch(theirs.fingerprint)
    return [] if message is None else [part.split(" differs")[0] for part in message.split("; ")]


@pytest.fixture
def vllm_hash_state(monkeypatch):
    """vLLM's hash globals as before EngineCore calls init_none_hash; restored afterwards."""
    from vllm.v1.core import kv_cache_utils

    monkeypatch.setattr(kv_cache_utils, "NONE_HASH", None, raising=False)
    monkeypatch.setattr(kv_cache_utils, "_NONE_HASH_SEED", None)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    return kv_cache_utils


# -- cross-TP ------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "tps"), [(TINY, (1, 2, 4)), (GQA8, (1, 2, 4, 8))])
def test_canonical_layout_nodes_share_one_fingerprint_across_tp(shape, tps):
    prints = [sim_tier_fingerprint(shape, tp_size=tp, canonical=True) for tp in tps]
    assert {p.fingerprint.digest for p in prints} == {prints[0].fingerprint.digest}
    assert prints[0].fingerprint.ingredients["parallelism"] == "agnostic"
    assert prints[0].fingerprint.ingredients["layout"] == "canonical v1-hnd"
    assert all(p.shareable and p.warning is None for p in prints)


def test_direct_layout_nodes_with_different_tp_do_not_share_and_say_why():
    tp1 = sim_tier_fingerprint(TINY, tp_size=1, canonical=False)
    tp2 = sim_tier_fingerprint(TINY, tp_size=2, canonical=False)
    assert differing(tp1, tp2) == ["parallelism"]
    message = tp1.fingerprint.mismatch(tp2.fingerprint)
    assert "ours tp=1 pp=1 pcp=1 dcp=1, theirs tp=2 pp=1 pcp=1 dcp=1" in message
    assert "TP differs and canonical_layout is off" in message


def test_direct_layout_names_tp_even_where_vllm_calls_it_parallelism_agnostic():
    # With the V1 model runner vLLM marks this direct layout portable across TP, and
    # its FileMapper/p2p namespace collapses TP; the bytes say otherwise (below).
    spec = sim_spec(TINY, tp_size=2, canonical=False, v2_model_runner=False)
    assert spec.config.parallel.is_parallelism_agnostic
    tp1 = sim_tier_fingerprint(TINY, tp_size=1, canonical=False, v2_model_runner=False)
    tp2 = sim_tier_fingerprint(TINY, tp_size=2, canonical=False, v2_model_runner=False)
    assert differing(tp1, tp2) == ["parallelism"]

    geometry = KVGeometry.of(TINY)
    kv = random_kv_cache(geometry, 4, seed=3)
    assert not np.array_equal(
        direct_chunk_row(kv, geometry, 1, [2]), direct_chunk_row(kv, geometry, 2, [2])
    )


def test_canonical_and_direct_nodes_do_not_share():
    canonical = sim_tier_fingerprint(TINY, tp_size=1, canonical=True)
    direct = sim_tier_fingerprint(TINY, tp_size=1, canonical=False)
    assert differing(canonical, direct) == ["layout", "parallelism"]
    assert "set canonical_layout the same way on all nodes" in canonical.fingerprint.mismatch(
        direct.fingerprint
    )


def test_replicated_heads_change_the_row_size_so_those_nodes_do_not_share():
    # TP=8 over 4 KV heads replicates heads: vLLM sizes the row for 8 worker copies,
    # so the canonical bytes agree (see test below) but rows are not interchangeable.
    tp4 = sim_tier_fingerprint(TINY, tp_size=4, canonical=True)
    tp8 = sim_tier_fingerprint(TINY, tp_size=8, canonical=True)
    assert differing(tp4, tp8) == ["chunk bytes"]


# -- each ingredient separates nodes, with the right reason ---------------------


@pytest.mark.parametrize(
    ("theirs", "expected"),
    [
        (
            {"shape": ModelShape("other-org/other-model", 2, 4, 8, "float16")},
            ["model"],
        ),
        ({"shape": ModelShape(TINY.name, 2, 4, 8, "bfloat16")}, ["dtype"]),
        ({"tokens_per_block": 32}, ["chunk bytes", "kv groups", "tokens per hash"]),
        ({"blocks_per_chunk": 2}, ["blocks per chunk", "chunk bytes"]),
        ({"hash_identity": assumed_hash_identity("sha256_cbor")}, ["hash algo"]),
    ],
    ids=["model", "dtype", "block-size", "blocks-per-chunk", "hash-algo"],
)
def test_each_ingredient_separates_nodes_with_its_reason(theirs, expected, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    ours = sim_tier_fingerprint(TINY)
    other = sim_tier_fingerprint(theirs.pop("shape", TINY), **theirs)
    assert differing(ours, other) == expected
    message = ours.fingerprint.mismatch(other.fingerprint)
    hints = {
        "model": "the nodes serve different models",
        "dtype": "--kv-cache-dtype",
        "tokens per hash": "use the same --block-size on all nodes",
        "blocks per chunk": "use the same blocks_per_chunk/block_size",
        "hash algo": "use the same --prefix-caching-hash-algo on all nodes",
    }
    for name in expected:
        if name in hints:
            assert hints[name] in message


def test_every_ingredient_has_an_actionable_hint():
    from kvpeer.api.fingerprint import MISMATCH_HINTS

    ingredients = sim_tier_fingerprint(TINY).fingerprint.ingredients
    assert sorted(ingredients) == sorted(
        [
            "protocol_version",
            "inference_engine",
            "model",
            "dtype",
            "tokens_per_hash",
            "blocks_per_chunk",
            "kv_groups",
            "chunk_bytes",
            "layout",
            "parallelism",
            "hash_algo",
            "hash_seed",
        ]
    )
    assert set(ingredients) <= set(MISMATCH_HINTS)


def test_hash_seed_separates_nodes_and_names_pythonhashseed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    default = sim_tier_fingerprint(TINY)
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    seeded = sim_tier_fingerprint(TINY)
    assert differing(default, seeded) == ["hash seed"]
    assert "set the same PYTHONHASHSEED on all nodes" in default.fingerprint.mismatch(
        seeded.fingerprint
    )
    assert default.fingerprint.ingredients["hash_seed"] == "vllm-none-hash"
    assert seeded.fingerprint.ingredients["hash_seed"] == (
        "sha256:" + hashlib.sha256(b"42").hexdigest()[:12]
    )


def test_xxhash_without_pythonhashseed_is_not_shareable_and_warns(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    lonely = sim_tier_fingerprint(TINY, hash_identity=assumed_hash_identity("xxhash"))
    assert not lonely.shareable
    assert "PYTHONHASHSEED" in lonely.warning and "xxhash" in lonely.warning
    assert lonely.fingerprint.ingredients["hash_seed"].startswith("random-per-process ")
    sha = sim_tier_fingerprint(TINY)
    assert differing(sha, lonely) == ["hash algo", "hash seed"]


def test_xxhash_with_pythonhashseed_is_shareable(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    a = sim_tier_fingerprint(TINY, hash_identity=assumed_hash_identity("xxhash_cbor"))
    b = sim_tier_fingerprint(TINY, tp_size=2, hash_identity=assumed_hash_identity("xxhash_cbor"))
    assert a.shareable and a.warning is None
    assert a.fingerprint.digest == b.fingerprint.digest


def test_a_random_seed_is_never_shown_in_clear():
    seed = "9f" * 32  # what vLLM draws: os.urandom(32).hex()
    identity = HashIdentity("xxhash", seed, random_seed=True, from_engine=True)
    shown = identity.seed_ingredient()
    assert seed not in shown and seed[:8] not in shown
    assert shown == "random-per-process " + hashlib.sha256(seed.encode()).hexdigest()[:12]


def test_unknown_hash_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown prefix-caching hash algorithm 'md5'"):
        assumed_hash_identity("md5")


def test_chunk_bytes_must_be_positive():
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        tier_fingerprint(sim_spec(TINY), 0)


# -- where the hash algorithm and seed come from ---------------------------------


def test_before_init_none_hash_vllm_reports_the_default_seed_so_the_tier_must_wait(
    vllm_hash_state, monkeypatch
):
    # The tier is built inside Scheduler.__init__, before EngineCore calls
    # init_none_hash: vLLM's own accessor then ignores PYTHONHASHSEED.
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert vllm_hash_state.get_none_hash_seed() == "vllm-none-hash"
    assert engine_hash_identity() is None
    spec = sim_spec(TINY)
    fallback = tier_fingerprint(spec, spec.kv_bytes_per_chunk)
    assert not fallback.hash_identity.from_engine
    assert fallback.hash_identity == assumed_hash_identity()
    assert fallback.hash_identity.seed == "42"


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize("pythonhashseed", [None, "42"])
def test_after_init_none_hash_the_engine_identity_is_exact(
    vllm_hash_state, monkeypatch, algo, pythonhashseed
):
    from vllm.utils.hashing import get_hash_fn_by_name

    if pythonhashseed is not None:
        monkeypatch.setenv("PYTHONHASHSEED", pythonhashseed)
    vllm_hash_state.init_none_hash(get_hash_fn_by_name(algo))  # what EngineCore.__init__ does
    identity = engine_hash_identity()
    assert identity == HashIdentity(
        algo, pythonhashseed or "vllm-none-hash", random_seed=False, from_engine=True
    )
    spec = sim_spec(TINY)
    derived = tier_fingerprint(spec, spec.kv_bytes_per_chunk)
    assert derived.hash_identity == identity
    assert derived.fingerprint.ingredients["hash_algo"] == algo
    # a node that derived it without an engine (vLLM's rule) gets the same digest
    assumed = tier_fingerprint(
        spec, spec.kv_bytes_per_chunk, hash_identity=assumed_hash_identity(algo)
    )
    assert assumed.fingerprint == derived.fingerprint


def test_await_engine_hash_identity_returns_once_the_engine_initialised_it(vllm_hash_state):
    from vllm.utils.hashing import sha256_cbor

    started = time.monotonic()
    assert await_engine_hash_identity(0.05) is None
    assert time.monotonic() - started < 5

    timer = threading.Timer(0.2, vllm_hash_state.init_none_hash, [sha256_cbor])
    timer.start()
    try:
        identity = await_engine_hash_identity(30)
    finally:
        timer.join()
    assert identity is not None and identity.algo == "sha256_cbor"


# -- canonical pages across TP, on the CPU --------------------------------------


@pytest.fixture(params=[(TINY, (1, 2, 4)), (GQA8, (1, 2, 4, 8))], ids=["tiny-mha4", "gqa8"])
def model(request):
    shape, tps = request.param
    geometry = KVGeometry.of(shape)
    return geometry, tps, random_kv_cache(geometry, 8, seed=11)


def _full_pages(kv, block_ids) -> np.ndarray:
    """Oracle: layer by layer, the whole TP=1 page of each block, back to back."""
    return np.concatenate(
        [layer[b].contiguous().view(torch.uint8).numpy().ravel() for layer in kv for b in block_ids]
    )


def test_canonical_rows_are_byte_identical_across_tp(model):
    geometry, tps, kv = model
    block_ids = [5, 2]  # a chunk of 2 GPU blocks, anywhere in the GPU cache
    rows = {tp: canonical_chunk_row(kv, geometry, tp, block_ids, chunk_id=3) for tp in tps}
    expected = _full_pages(kv, block_ids)
    for tp, row in rows.items():
        assert np.array_equal(row, expected), f"TP={tp} canonical row differs from TP=1"


def test_direct_rows_differ_across_tp(model):
    geometry, tps, kv = model
    block_ids = [5, 2]
    rows = {tp: direct_chunk_row(kv, geometry, tp, block_ids) for tp in tps}
    assert np.array_equal(rows[1], _full_pages(kv, block_ids))
    for tp in tps[1:]:
        assert not np.array_equal(rows[tp], rows[1]), f"TP={tp} direct row equals TP=1"
        # the same bytes, in a TP-specific order
        assert np.array_equal(np.sort(rows[tp]), np.sort(rows[1]))


@pytest.mark.parametrize("producer_tp", [2, 4])
def test_each_consumer_rank_loads_its_own_pages_from_another_tps_row(model, producer_tp):
    geometry, tps, kv = model
    block_ids = [1, 6]
    row = canonical_chunk_row(kv, geometry, producer_tp, block_ids, chunk_id=0)
    for consumer_tp in tps:
        for rank in range(consumer_tp):
            loaded = gpu_pages_from_canonical_row(row, geometry, consumer_tp, rank, len(block_ids))
            expected = rank_kv_cache(kv, geometry, consumer_tp, rank)
            for layer, pages in enumerate(loaded):
                want = expected[layer][block_ids].view(torch.uint8).reshape(len(block_ids), -1)
                assert np.array_equal(pages, want.numpy()), (consumer_tp, rank, layer)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_canonical_rows_fill_vllms_primary_row(tp):
    spec = sim_spec(TINY, tp_size=tp, canonical=True, blocks_per_chunk=2)
    geometry = KVGeometry.of(TINY)
    kv = random_kv_cache(geometry, 4, seed=5)
    row = canonical_chunk_row(kv, geometry, tp, [0, 3], row_bytes=spec.kv_bytes_per_chunk)
    used = spec.config.worker_kv_bytes_per_block * tp * 2
    assert len(row) == spec.kv_bytes_per_chunk >= used
    assert np.array_equal(row[:used], _full_pages(kv, [0, 3]))
    assert not row[used:].any()
    with pytest.raises(ValueError, match="smaller than the chunk"):
        canonical_chunk_row(kv, geometry, tp, [0, 3], row_bytes=used - 1)
