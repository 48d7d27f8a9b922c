"""Run vLLM's scheduler-side offloading stack without a GPU.

vLLM's GPU worker cannot run on a CPU-only machine, but everything kvpeer plugs
into can: the real ``TieringOffloadingSpec``, ``TieringOffloadingManager`` and
shared-memory primary tier. This package builds them from a model shape
(:mod:`.vllm_config`), drives them the way vLLM's scheduler does
(:mod:`.engine`), and runs each node in its own OS process (:mod:`.node`).
The demo (:mod:`.demo`), the benchmarks and the tests all use it; none of it
replaces kvpeer code. It may import anything in kvpeer.
"""
