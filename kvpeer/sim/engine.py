"""Drive vLLM's ``TieringOffloadingManager`` the way vLLM's scheduler does.

vLLM's ``OffloadingConnectorScheduler`` talks to the manager in a fixed pattern,
always under ``manager.lock``: ``on_new_request``; each step, ``lookup`` over the
request's chunk keys in prefix order until a MISS (a RETRY or HIT_PENDING defers
the request to a later step) and ``on_schedule_end`` at the end of the step;
``prepare_load``/``complete_load`` around the GPU load of the hit prefix;
``prepare_store``, the GPU->CPU copy into the returned rows, and
``complete_store`` for what it computed; ``on_request_finished``. The GPU copies
are what this module replaces: rows are written and read as bytes.

:class:`SchedulerDriver` performs that pattern for whole requests and runs the
empty engine steps vLLM runs while ``has_pending_work()`` is true.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext

END_OF_STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())
#: Pause between engine steps while a request waits on deferred lookups.
STEP_S = 0.001


@dataclass
class RequestReport:
    """What one request did: chunks found and loaded, computed, and timings."""

    hit_chunks: int = 0
    loaded_rows: list[bytes] | None = None
    stored_chunks: int = 0
    lookup_s: float = 0.0
    load_s: float = 0.0
    steps: int = 0

    def checked(
        self, keys: Sequence[bytes], expected: Callable[[bytes], bytes], chunk_bytes: int
    ) -> dict[str, Any]:
        """The report as a node process answers it, each loaded row checked byte for byte.

        ``keys`` are the request's keys; ``expected(key)`` is the row its holder wrote.
        ``wrong_chunks`` lists the positions of loaded rows that differ (must stay []).
        """
        loaded = self.loaded_rows or []
        wrong = [i for i, row in enumerate(loaded) if row != expected(keys[i])]
        return {
            "hit_chunks": self.hit_chunks,
            "verified_chunks": len(loaded) - len(wrong),
            "wrong_chunks": wrong,
            "stored_chunks": self.stored_chunks,
            "lookup_s": self.lookup_s,
            "load_s": self.load_s,
            "steps": self.steps,
            "bytes_loaded": len(loaded) * chunk_bytes,
        }


class SchedulerDriver:
    """Runs requests against a manager as vLLM's scheduler would. Thread-safe."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._engine = threading.Thread(target=self._engine_loop, name="sim-engine", daemon=True)
        self._engine.start()

    @property
    def engine_thread_id(self) -> int | None:
        """Native id of the thread running the empty engine steps."""
        return self._engine.native_id

    # -- whole requests -------------------------------------------------------

    def run_request(
        self,
        req_id: str,
        keys: Sequence[bytes],
        *,
        params: dict[str, Any] | None = None,
        compute: Callable[[bytes], bytes] | None = None,
        read_loaded: bool = True,
        timeout_s: float = 60.0,
    ) -> RequestReport:
        """One request over ``keys`` (its full chunks, in prefix order).

        Looks the keys up until the answers settle, loads the hit prefix (returning
        the loaded rows' bytes if ``read_loaded``), then, if ``compute`` is given,
        stores the rest with the bytes ``compute(key)`` returns — all of them for a
        request-level (PD producer) request, as vLLM does.
        """
        report = RequestReport()
        ctx = ReqContext(req_id=req_id, kv_transfer_params=params)
        with self.manager.lock:
            request_level = self.manager.on_new_request(ctx).policy.value == "request_level"
        started = time.monotonic()
        hits = self._lookup_until_settled(keys, ctx, report, started + timeout_s)
        report.lookup_s = time.monotonic() - started
        report.hit_chunks = hits
        if hits:
            started = time.monotonic()
            report.loaded_rows = self._load(keys[:hits], ctx, read_loaded)
            report.load_s = time.monotonic() - started
        if compute is not None:
            to_store = list(keys) if request_level else list(keys[hits:])
            report.stored_chunks = self.store(to_store, ctx, compute)
        with self.manager.lock:
            self.manager.on_request_finished(ctx)
            self.manager.on_schedule_end(END_OF_STEP)
        self._wake.set()
        return report

    def store_request(
        self,
        req_id: str,
        keys: Sequence[bytes],
        compute: Callable[[bytes], bytes],
        params: dict[str, Any] | None = None,
    ) -> int:
        """A whole request that only stores ``keys`` (a fresh prefill, no lookups).

        ``params`` are its ``kv_transfer_params`` (e.g. a PD producer's). Returns the
        chunks written.
        """
        ctx = ReqContext(req_id=req_id, kv_transfer_params=params)
        with self.manager.lock:
            self.manager.on_new_request(ctx)
        stored = self.store(keys, ctx, compute)
        with self.manager.lock:
            self.manager.on_request_finished(ctx)
            self.manager.on_schedule_end(END_OF_STEP)
        return stored

    def store(
        self, keys: Sequence[bytes], ctx: ReqContext, compute: Callable[[bytes], bytes]
    ) -> int:
        """prepare_store, write the rows vLLM allocated, complete_store; return chunks written."""
        if not keys:
            return 0
        with self.manager.lock:
            out = self.manager.prepare_store(list(keys), ctx)
            if out is None:
                return 0
            chunk_ids = list(out.store_spec.chunk_ids)
            assert len(chunk_ids) == len(out.keys_to_store)
        self.write_rows(chunk_ids, [compute(bytes(k)) for k in out.keys_to_store])
        with self.manager.lock:
            self.manager.complete_store(out.keys_to_store, ctx)
            self.manager.on_schedule_end(END_OF_STEP)
        self._wake.set()
        return len(chunk_ids)

    # -- steps ----------------------------------------------------------------

    def _lookup_until_settled(
        self, keys: Sequence[bytes], ctx: ReqContext, report: RequestReport, deadline: float
    ) -> int:
        """Maximal-prefix lookup as ``_maximal_prefix_lookup``, one try per engine step."""
        while True:
            report.steps += 1
            with self.manager.lock:
                hits, deferred = 0, False
                for key in keys:
                    result = self.manager.lookup(key, ctx)
                    if result in (LookupResult.HIT, LookupResult.HIT_PENDING):
                        hits += 1
                        deferred |= result is LookupResult.HIT_PENDING
                    elif result is LookupResult.RETRY:
                        deferred = True  # vLLM keeps scanning so the tier sees every key
                    else:
                        break
                self.manager.on_schedule_end(END_OF_STEP)
            if not deferred:
                return hits
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookups still deferred after {report.steps} steps")
            time.sleep(STEP_S)

    def _load(self, keys: Sequence[bytes], ctx: ReqContext, read: bool) -> list[bytes] | None:
        with self.manager.lock:
            spec = self.manager.prepare_load(list(keys), ctx)
        rows = self.read_rows(spec.chunk_ids) if read else None
        with self.manager.lock:
            self.manager.complete_load(list(keys), ctx)
        return rows

    def _engine_loop(self) -> None:
        """Empty steps while the manager has pending work, as vLLM's engine core runs."""
        while not self._stop.is_set():
            with self.manager.lock:
                pending = self.manager.has_pending_work()
                if pending:
                    self.manager.on_schedule_end(END_OF_STEP)
            if pending:
                time.sleep(STEP_S)
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    # -- rows -----------------------------------------------------------------

    def write_rows(self, chunk_ids: Sequence[int], rows: Sequence[bytes]) -> None:
        """The GPU->CPU copy: write each row into the primary tier."""
        view = self.manager.primary_tier.get_kv_memoryview()
        stride = view.strides[0]
        with view.cast("B") as flat:
            for chunk_id, data in zip(chunk_ids, rows, strict=True):
                flat[int(chunk_id) * stride : (int(chunk_id) + 1) * stride] = data

    def read_rows(self, chunk_ids: Sequence[int]) -> list[bytes]:
        """The CPU->GPU copy: read rows out of the primary tier."""
        view = self.manager.primary_tier.get_kv_memoryview()
        stride = view.strides[0]
        with view.cast("B") as flat:
            return [bytes(flat[int(c) * stride : (int(c) + 1) * stride]) for c in chunk_ids]

    def pinned_chunks(self) -> int:
        """Primary rows pinned by a reader or a pending write (ref count != 0): 0 when idle."""
        with self.manager.lock:
            chunks = self.manager.primary_tier._policy.chunks.values()
            return sum(1 for chunk in chunks if chunk.ref_cnt != 0)

    def close(self) -> None:
        """Stop the engine loop and shut the manager down (without its lock, as vLLM does)."""
        self._stop.set()
        self._wake.set()
        self._engine.join(timeout=5)
        self.manager.shutdown()
