"""TEST SUPPORT: a CPU stand-in for vLLM's GPU<->CPU offloading worker.

vLLM's CPU offloading worker refuses the CPU platform ("CPU Offloading is
currently only supported on CUDA-alike and XPU GPUs"): it copies with CUDA
streams and events. On a CPU-only machine the engine's KV cache already lives in
host memory, so the DMA it stands for is a plain ``memmove`` between the engine's
KV tensors and the shared-memory primary region. :class:`SyncCPUTieringSpec` is
``TieringOffloadingSpec`` (kvpeer's tier, vLLM's primary tier, the same
``/dev/shm`` region) with only the worker replaced; the engine loads it through
``"spec_name": "SyncCPUTieringSpec", "spec_module_path": "sync_offload"``.

Contract: every job is copied before ``submit_*`` returns and is reported by the
next ``get_finished()``. Direct layout only (``canonical_layout`` off): chunk row
``c`` of tensor ``t`` holds ``blocks_per_chunk`` engine pages of that tensor,
exactly as vLLM's own worker lays them out.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec


class SyncCPUOffloadingWorker(OffloadingWorker):
    """Copies engine KV pages to/from primary-tier chunk rows synchronously."""

    def __init__(
        self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, region: SharedOffloadRegion
    ) -> None:
        self._region = region
        self._blocks_per_chunk = blocks_per_chunk
        self._refs = kv_caches.group_data_refs
        self._engine: list[torch.Tensor] = []
        self._primary: list[torch.Tensor] = []
        for kv in kv_caches.tensors:
            self._engine.append(kv.tensor.view(torch.int8).view(-1, kv.page_size_bytes))
            self._primary.append(
                region.create_next_worker_view(kv.page_size_bytes * blocks_per_chunk)
            )
        self._finished: list[TransferResult] = []

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        assert isinstance(dst_spec, CPULoadStoreSpec)
        return self._copy(job_id, src_spec, dst_spec.block_ids, to_primary=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, CPULoadStoreSpec)
        return self._copy(job_id, dst_spec, src_spec.block_ids, to_primary=False)

    def _copy(
        self, job_id: int, engine_spec: GPULoadStoreSpec, chunks: np.ndarray, to_primary: bool
    ) -> bool:
        """One job: each KV group's engine blocks against its primary chunks (which may
        start part-way into the first chunk, as in vLLM's worker)."""
        start = time.perf_counter()
        blocks = engine_spec.block_ids
        block_off = chunk_off = 0
        nbytes = 0
        for group, (size, index) in enumerate(
            zip(engine_spec.group_sizes, engine_spec.block_indices, strict=True)
        ):
            if size == 0:
                continue
            skip = index % self._blocks_per_chunk
            nchunks = cdiv(size + skip, self._blocks_per_chunk)
            group_blocks = blocks[block_off : block_off + size]
            group_chunks = chunks[chunk_off : chunk_off + nchunks]
            for ref in self._refs[group]:
                engine_ptrs = np.empty(size, dtype=np.uint64)
                primary_ptrs = np.empty(size, dtype=np.uint64)
                compute_sub_block_ptrs(group_blocks, 1, engine_ptrs, self._engine[ref.tensor_idx])
                compute_sub_block_ptrs(
                    group_chunks,
                    self._blocks_per_chunk,
                    primary_ptrs,
                    self._primary[ref.tensor_idx],
                    skip_count=skip,
                )
                src, dst = (
                    (engine_ptrs, primary_ptrs) if to_primary else (primary_ptrs, engine_ptrs)
                )
                for s, d in zip(src.tolist(), dst.tolist(), strict=True):
                    ctypes.memmove(d, s, ref.page_size_bytes)
                nbytes += size * ref.page_size_bytes
            block_off += size
            chunk_off += nchunks
        assert block_off == len(blocks) and chunk_off == len(chunks)
        self._finished.append(TransferResult(job_id, True, nbytes, time.perf_counter() - start))
        return True

    def get_finished(self) -> list[TransferResult]:
        out, self._finished = self._finished, []
        return out

    def wait(self, job_ids: set[int]) -> None:
        return  # every job finished inside submit_*

    def shutdown(self) -> None:
        self._region.cleanup()


class SyncCPUTieringSpec(TieringOffloadingSpec):
    """``TieringOffloadingSpec`` whose worker runs on the CPU platform (see module doc)."""

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self.config.canonical_layout:
            raise ValueError("SyncCPUTieringSpec supports the direct layout only")
        if self._worker is None:
            region = SharedOffloadRegion(
                engine_id=self._engine_id,
                num_chunks=self.num_chunks,
                rank=self.config.parallel.rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
            )
            try:
                self._worker = SyncCPUOffloadingWorker(kv_caches, self.blocks_per_chunk, region)
            except Exception:
                region.cleanup()
                raise
        return self._worker
