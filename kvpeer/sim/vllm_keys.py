"""A request's chunk keys the way vLLM's scheduler computes them (imports vLLM).

:func:`vllm_chunk_keys` builds a real ``vllm.v1.request.Request`` with vLLM's
request block hasher (``get_request_block_hasher``: the hasher EngineCore gives
every request) and takes every ``blocks_per_chunk``-th hash, as the offloading
connector's ``RequestOffloadState.update_offload_keys`` does, packed with
``make_offload_key``. Simulated nodes use it so the keys their tier publishes
come from vLLM's code, not kvpeer's (:mod:`kvpeer.api.keys` is checked against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice


def vllm_chunk_keys(
    tokens: Sequence[int],
    *,
    block_size: int,
    blocks_per_chunk: int = 1,
    hash_algo: str = "sha256",
    cache_salt: str | None = None,
    lora: tuple[str, str] | None = None,
    group_idx: int = 0,
) -> list[bytes]:
    """vLLM's OffloadKeys of ``tokens``; ``init_none_hash`` must have run in this process."""
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.kv_offload.base import make_offload_key
    from vllm.v1.request import Request

    hasher = get_request_block_hasher(block_size, get_hash_fn_by_name(hash_algo))
    request = Request(
        "kvpeer-keys",
        list(tokens),
        SamplingParams(max_tokens=1),
        None,
        lora_request=LoRARequest(lora[0], 1, lora[1]) if lora else None,
        cache_salt=cache_salt,
        block_hasher=hasher,
    )
    return [
        bytes(make_offload_key(h, group_idx))
        for h in islice(request.block_hashes, blocks_per_chunk - 1, None, blocks_per_chunk)
    ]
