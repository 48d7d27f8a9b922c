"""Primary-tier chunk rows as vLLM's GPU workers write them, computed on the CPU.

vLLM's CPU offloading worker copies each rank's GPU KV pages into the shared
primary tier. With ``canonical_layout`` every rank writes its bytes into one
parallelism-free canonical page per layer and block; without it each rank
fills a private slot of the row. The copy kernels need a GPU, but what they copy
is decided in pure Python: ``derive_canonical_mappings`` gives each rank's
``CanonicalPageMapping`` and the worker unrolls it with ``_build_copy_plan``
(``v1/kv_offload/cpu/gpu_worker.py``). This module runs exactly those functions
on real ``FullAttentionSpec`` objects and plays the copies with numpy, so that:

- tests can show that a TP=2 producer's canonical row is byte-identical to a
  TP=1 (or TP=4) producer's for the same KV, and that direct rows are not;
- the demo and benchmarks can fill primary rows with TP-correct bytes.

Layouts follow vLLM 0.33.0 with the KV layout ``LBHNC`` that
``OffloadingConnector`` requires: one tensor per layer, a block page is
``[head][token][K|V]``. A primary row is

- canonical: ``[layer0: bpc canonical pages | layer1: ... | padding]``
  (``SharedOffloadRegion.create_next_canonical_view``);
- direct: ``[rank0 slot | rank1 slot | ... | padding]``, a slot being
  ``[layer0: bpc GPU pages of that rank | layer1: ...]``
  (``create_next_worker_view``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvpeer.sim.vllm_config import ModelShape

if TYPE_CHECKING:
    from vllm.config import ParallelConfig
    from vllm.v1.kv_offload.base import CanonicalPageMapping

_TORCH_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a model's KV cache on vLLM's GPU workers (full attention, LBHNC)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: torch.dtype

    @classmethod
    def of(cls, shape: ModelShape, tokens_per_block: int = 16) -> KVGeometry:
        return cls(
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_dim,
            tokens_per_block,
            _TORCH_DTYPES[shape.dtype],
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers))

    def heads_per_rank(self, tp_size: int) -> int:
        """KV heads on each rank; heads are replicated when TP exceeds them (as vLLM does)."""
        heads = self.num_kv_heads
        if heads % tp_size and tp_size % heads:
            raise ValueError(f"{heads} KV heads cannot be split over TP={tp_size}")
        return max(1, heads // tp_size)

    def page_bytes(self, tp_size: int = 1) -> int:
        """Bytes of one layer's GPU page (one block) on one rank."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.heads_per_rank(tp_size) * self.tokens_per_block * 2 * self.head_dim * elem


def random_kv_cache(geometry: KVGeometry, num_blocks: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Full (TP=1) KV tensors, one per layer, of random bytes.

    Shape ``(num_blocks, heads, tokens_per_block, 2 * head_dim)``: vLLM's LBHNC page.
    """
    generator = torch.Generator().manual_seed(seed)
    elem = torch.empty((), dtype=geometry.dtype).element_size()
    shape = (
        num_blocks,
        geometry.num_kv_heads,
        geometry.tokens_per_block,
        2 * geometry.head_dim * elem,
    )
    return [
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).view(geometry.dtype)
        for _ in range(geometry.num_layers)
    ]


def rank_kv_cache(
    kv: Sequence[torch.Tensor], geometry: KVGeometry, tp_size: int, rank: int
) -> list[torch.Tensor]:
    """The KV tensors rank ``rank`` of a TP=``tp_size`` engine holds: its head shard."""
    per_rank = geometry.heads_per_rank(tp_size)
    replication = max(1, tp_size // geometry.num_kv_heads)
    first = (rank // replication) * per_rank
    return [layer[:, first : first + per_rank].contiguous() for layer in kv]


def canonical_chunk_row(
    kv: Sequence[torch.Tensor],
    geometry: KVGeometry,
    tp_size: int,
    block_ids: Sequence[int],
    *,
    chunk_id: int = 0,
    row_bytes: int | None = None,
) -> np.ndarray:
    """The primary row all ranks of a TP=``tp_size`` engine write for one chunk (canonical).

    ``block_ids`` are the chunk's GPU blocks (``blocks_per_chunk`` of them) in
    ``kv``; ``chunk_id`` is the primary row, which picks the writer among ranks
    holding replicated heads. ``row_bytes`` pads to the row stride
    (``spec.kv_bytes_per_chunk``); by default the row ends with the last page.
    """
    plans = _copy_plans(geometry, tp_size, gpu_to_cpu=True)
    page_sizes = [plan.canonical_page_bytes for plan in plans[0]]
    bpc = len(block_ids)
    row = _empty_row(sum(page_sizes) * bpc, row_bytes)
    for rank in range(tp_size):
        local = _page_bytes(rank_kv_cache(kv, geometry, tp_size, rank))
        layer_offset = 0
        for layer, plan in enumerate(plans[rank]):
            page = page_sizes[layer]
            for j, block in enumerate(block_ids):
                if plan.mapping.is_writer(chunk_id * bpc + j):  # gpu_worker._canonical_page_ids
                    dst = row[layer_offset + j * page : layer_offset + (j + 1) * page]
                    plan.copy(local[layer][block], dst)
            layer_offset += page * bpc
    return row


def direct_chunk_row(
    kv: Sequence[torch.Tensor],
    geometry: KVGeometry,
    tp_size: int,
    block_ids: Sequence[int],
    *,
    row_bytes: int | None = None,
) -> np.ndarray:
    """The primary row of one chunk in vLLM's default (direct) layout: one slot per rank."""
    page = geometry.page_bytes(tp_size)
    slot = geometry.num_layers * len(block_ids) * page
    row = _empty_row(slot * tp_size, row_bytes)
    for rank in range(tp_size):
        local = _page_bytes(rank_kv_cache(kv, geometry, tp_size, rank))
        offset = rank * slot
        for layer_pages in local:
            for block in block_ids:
                row[offset : offset + page] = layer_pages[block]
                offset += page
    return row


def gpu_pages_from_canonical_row(
    row: np.ndarray, geometry: KVGeometry, tp_size: int, rank: int, blocks_per_chunk: int
) -> list[np.ndarray]:
    """What rank ``rank`` of a TP=``tp_size`` engine loads from a canonical row.

    One ``(blocks_per_chunk, page_bytes)`` array per layer: that rank's GPU pages,
    as the worker's CPU->GPU copy plan reads them.
    """
    plans = _copy_plans(geometry, tp_size, gpu_to_cpu=False)[rank]
    page = geometry.page_bytes(tp_size)
    pages = []
    offset = 0
    for plan in plans:
        canonical = plan.canonical_page_bytes
        out = np.zeros((blocks_per_chunk, page), dtype=np.uint8)
        for j in range(blocks_per_chunk):
            start = offset + j * canonical
            plan.copy(row[start : start + canonical], out[j])
        pages.append(out)
        offset += canonical * blocks_per_chunk
    return pages


@dataclass(frozen=True)
class _CopyPlan:
    """One layer's fragment copies for one rank and direction (vLLM's ``CopyPlan``)."""

    mapping: CanonicalPageMapping
    src_offsets: tuple[int, ...]
    dst_offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def canonical_page_bytes(self) -> int:
        return self.mapping.canonical_page_size_bytes

    def copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        for s, d, n in zip(self.src_offsets, self.dst_offsets, self.sizes, strict=True):
            if s + n > len(src) or d + n > len(dst):
                raise AssertionError(f"fragment {s}->{d} of {n} bytes leaves the page")
            dst[d : d + n] = src[s : s + n]


@functools.lru_cache(maxsize=64)
def _copy_plans(
    geometry: KVGeometry, tp_size: int, *, gpu_to_cpu: bool
) -> tuple[tuple[_CopyPlan, ...], ...]:
    """``[rank][layer]`` copy plans from vLLM's own mapping derivation and unrolling."""
    from vllm.config import ParallelConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.canonical_mapping import (
        derive_canonical_mappings,
    )
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.kv_offload.base import CanonicalKVCacheRef
    from vllm.v1.kv_offload.cpu.gpu_worker import _build_copy_plan

    heads = geometry.heads_per_rank(tp_size)
    spec = FullAttentionSpec(
        block_size=geometry.tokens_per_block,
        num_kv_heads=heads,
        head_size=geometry.head_dim,
        dtype=geometry.dtype,
    )
    names = geometry.layer_names
    kv_cache_config = KVCacheConfig(
        num_blocks=1, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(names), spec)]
    )
    rank_kv = torch.empty(
        (1, heads, geometry.tokens_per_block, 2 * geometry.head_dim), dtype=geometry.dtype
    )
    plans = []
    for rank in range(tp_size):
        config = _MappingConfig(
            parallel_config=ParallelConfig(tensor_parallel_size=tp_size, rank=rank),
            model_config=_ModelHeads(geometry.num_kv_heads),
        )
        mappings = derive_canonical_mappings(config, kv_cache_config, dict.fromkeys(names, rank_kv))
        rank_plans = []
        for name in names:
            mapping = mappings[name]
            if not mapping.parallelism_agnostic:
                raise ValueError(f"vLLM did not certify {name} at TP={tp_size} as canonical")
            ref = CanonicalKVCacheRef(0, spec.page_size_bytes, mapping)
            plan = _build_copy_plan(ref, gpu_to_cpu)
            rank_plans.append(
                _CopyPlan(
                    mapping,
                    tuple(int(x) for x in plan.frag_offsets_src),
                    tuple(int(x) for x in plan.frag_offsets_dst),
                    tuple(int(x) for x in plan.frag_sizes),
                )
            )
        plans.append(tuple(rank_plans))
    return tuple(plans)


@dataclass(frozen=True)
class _ModelHeads:
    """The one ``ModelConfig`` method ``derive_canonical_mappings`` calls."""

    total_num_kv_heads: int

    def get_total_num_kv_heads(self) -> int:
        return self.total_num_kv_heads


@dataclass(frozen=True)
class _MappingConfig:
    """The two ``VllmConfig`` fields ``derive_canonical_mappings`` reads.

    A full ``VllmConfig`` needs a Hugging Face model; the parallel config is vLLM's own.
    """

    parallel_config: ParallelConfig
    model_config: _ModelHeads


def _page_bytes(layers: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Each layer's pages as a ``(num_blocks, page_bytes)`` uint8 array (no copy)."""
    return [t.view(torch.uint8).reshape(t.shape[0], -1).numpy() for t in layers]


def _empty_row(used: int, row_bytes: int | None) -> np.ndarray:
    if row_bytes is not None and row_bytes < used:
        raise ValueError(f"row_bytes {row_bytes} is smaller than the chunk's {used} bytes")
    return np.zeros(used if row_bytes is None else row_bytes, dtype=np.uint8)
