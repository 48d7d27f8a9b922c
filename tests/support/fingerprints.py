"""Real vLLM offloading specs and the tier fingerprints kvpeer derives from them.

Specs come from :func:`kvpeer.sim.vllm_config.offloading_config` and vLLM's own
``OffloadingSpecFactory.create_spec`` (``TieringOffloadingSpec``), which computes
the primary row size; nothing is allocated until ``get_manager`` (not called here).
"""

from __future__ import annotations

from kvpeer.sim.vllm_config import TINY, ModelShape, offloading_config

#: Enough for a few rows of any shape the tests use; nothing is allocated.
_CPU_BYTES = 64 << 20


def sim_spec(
    shape: ModelShape = TINY,
    *,
    tp_size: int = 1,
    canonical: bool = True,
    tokens_per_block: int = 16,
    blocks_per_chunk: int = 1,
    v2_model_runner: bool = True,
):
    """vLLM's ``TieringOffloadingSpec`` for a node serving ``shape`` at TP=``tp_size``."""
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    extra = {
        "spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": _CPU_BYTES,
        "canonical_layout": canonical,
        "blocks_per_chunk": blocks_per_chunk,
        "secondary_tiers": [],
    }
    config = offloading_config(
        shape,
        extra,
        tokens_per_block=tokens_per_block,
        blocks_per_chunk=blocks_per_chunk,
        tp_size=tp_size,
        v2_model_runner=v2_model_runner,
    )
    return OffloadingSpecFactory.create_spec(config)


def sim_tier_fingerprint(shape: ModelShape = TINY, *, hash_identity=None, **spec_args):
    """The :class:`~kvpeer.tier.fingerprint.TierFingerprint` of :func:`sim_spec`'s node.

    ``hash_identity`` defaults to vLLM's defaults for sha256 under this process's
    PYTHONHASHSEED, whatever another test left in vLLM's global hash state.
    """
    from kvpeer.tier.fingerprint import assumed_hash_identity, tier_fingerprint

    spec = sim_spec(shape, **spec_args)
    return tier_fingerprint(
        spec, spec.kv_bytes_per_chunk, hash_identity=hash_identity or assumed_hash_identity()
    )
