"""Job results waiting to be reported to vLLM.

vLLM collects a tier's finished jobs by calling ``get_finished_jobs()`` under its
lock; kvpeer finishes jobs on its own threads (pullers, gRPC handlers, the lease
reaper). The outbox is the hand-over point: any thread may :meth:`put`, and
``get_finished_jobs`` :meth:`take` s everything at once, so each job is reported
exactly once.
"""

from __future__ import annotations

import threading

from vllm.v1.kv_offload.tiering.base import JobResult


class JobOutbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: list[JobResult] = []

    def put(self, result: JobResult) -> None:
        with self._lock:
            self._results.append(result)

    def take(self) -> list[JobResult]:
        with self._lock:
            results, self._results = self._results, []
        return results

    def __len__(self) -> int:
        return len(self._results)
