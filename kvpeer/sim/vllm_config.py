"""Build vLLM ``OffloadingConfig`` objects for a model shape, as vLLM itself would.

vLLM derives its ``OffloadingConfig`` from a ``VllmConfig`` and the GPU's
``KVCacheConfig`` (``offloading/config.py``), which need a GPU. This module
produces the same object from the few numbers that matter (layers, KV heads,
head size, dtype, block size, TP), mirroring vLLM's rules for the bytes per
block and for ``is_parallelism_agnostic``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "fp8_e4m3": 1}


@dataclass(frozen=True)
class ModelShape:
    """The KV-relevant shape of a decoder-only, full-attention (GQA/MHA) model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def kv_bytes_per_token(self) -> int:
        """K and V bytes of one token, all layers and heads (TP=1)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * _DTYPE_BYTES[self.dtype]


#: Llama-3-8B: 32 layers, 8 KV heads of 128, bf16 -> 128 KiB of KV per token.
LLAMA3_8B = ModelShape("meta-llama/Meta-Llama-3-8B", 32, 8, 128, "bfloat16")
#: A tiny shape for fast tests: 2 layers, 4 KV heads of 8, fp16 -> 128 B per token.
TINY = ModelShape("kvpeer/tiny-test-model", 2, 4, 8, "float16")


def offloading_config(
    shape: ModelShape,
    extra_config: Mapping[str, Any],
    *,
    engine_id: str | None = None,
    tokens_per_block: int = 16,
    blocks_per_chunk: int = 1,
    tp_size: int = 1,
    data_parallel_index: int = 0,
    v2_model_runner: bool = True,
):
    """An ``OffloadingConfig`` for ``shape`` on a TP=``tp_size`` engine.

    ``extra_config`` is ``kv_connector_extra_config`` (``canonical_layout`` is read
    from it, as vLLM does). ``v2_model_runner`` mirrors vLLM 0.33.0's default on
    CUDA, which makes the direct layout parallelism-specific.
    """
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingGroupConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )

    if shape.num_kv_heads % tp_size and tp_size % shape.num_kv_heads:
        raise ValueError(f"{shape.num_kv_heads} KV heads cannot be split over TP={tp_size}")
    heads_per_rank = max(1, shape.num_kv_heads // tp_size)
    worker_bytes_per_block = (
        shape.num_layers
        * 2
        * heads_per_rank
        * shape.head_dim
        * tokens_per_block
        * _DTYPE_BYTES[shape.dtype]
    )
    canonical = bool(extra_config.get("canonical_layout", False))
    if canonical:
        # vLLM's spec_certifiable(): head-divisible full attention, TP-only.
        agnostic = True
    else:
        agnostic = not v2_model_runner and shape.num_kv_heads % tp_size == 0
    layer_names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers))
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block, layer_names, 0),),
        worker_kv_bytes_per_block=worker_bytes_per_block,
        enable_kv_cache_events=False,
        extra_config=dict(extra_config),
        engine_id=engine_id or f"kvpeer-sim-{os.getpid()}-{id(extra_config):x}",
        model=OffloadingModelConfig(shape.name, shape.dtype, 8192),
        cache=OffloadingCacheConfig(tokens_per_block, blocks_per_chunk),
        parallel=OffloadingParallelConfig(
            rank=0,
            world_size=tp_size,
            tp_size=tp_size,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=data_parallel_index,
            data_parallel_size=data_parallel_index + 1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=agnostic,
        ),
        canonical_layout=canonical,
        kv_cache_layout="LBHNC",
    )
