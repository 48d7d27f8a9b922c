"""TEST SUPPORT: one real vLLM engine (CPU) in its own process, driven over JSON lines.

Run with the engine venv (``.venv-engine/bin/python``)::

    python tests/engine/support/driver.py '{"model": DIR, "tier": {...} | null, ...}'

It starts ``vllm.LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the
scheduler, kvpeer's tier and the worker all live here), prints
``{"event": "ready", ...}`` and then answers one JSON line per command line on stdin:

* ``{"op": "generate", "prompt": [ids], "max_tokens": n, "kv_transfer_params": {...}}``
  -> ``{"tokens": [...], "num_cached_tokens": n, "ttft_s": s, "metrics": {...}}``,
  where ``metrics`` are the offloading counters this request's steps reported;
* ``{"op": "metrics"}`` -> the counters since start;
* ``{"op": "busy", "on": bool}``: keep the engine stepping on a dummy request while no
  real request runs. vLLM 0.32 has no tier-poll thread, so a tier serves peers only
  while its own engine steps; a holder must be kept busy while a peer asks;
* ``{"op": "reset"}``: vLLM's ``reset_prefix_cache`` (the local cache and the tier);
* ``{"op": "shutdown"}``.

Counters: every offloading stats payload vLLM takes from the tiering manager
(``get_stats``, which merges kvpeer's ``vllm:kvpeer_*`` and vLLM's own tiering
counters) is summed here, keyed ``name`` or ``name{label,...}``. The driver also
takes them itself after each step, so they are counted even where vLLM's offline
engine does not log stats. Only the main thread touches the engine.

The protocol owns the process's original stdout; everything else written to fd 1
(vLLM logs to stdout) goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
_protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

#: A short dummy request that keeps a holder's engine stepping (see module doc).
BUSY_PROMPT = list(range(900, 940))
BUSY_TOKENS = 64


class Counters:
    """Sums the counters of the offloading stats payloads vLLM takes from the manager."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def add(self, stats: Any) -> None:
        if stats is None or stats.is_empty():
            return
        data = stats.data
        for name, by_labels in data["data"].items():
            if data["types"].get(name) != "counter":
                continue
            for labels, value in by_labels.items():
                key = f"{name}{{{','.join(labels)}}}" if labels else name
                self.total[key] = self.total.get(key, 0) + value


def _install_counter_hook(counters: Counters) -> None:
    from vllm.v1.kv_offload.tiering.manager import TieringOffloadingManager

    original = TieringOffloadingManager.get_stats

    def get_stats(self: TieringOffloadingManager) -> Any:
        stats = original(self)
        counters.add(stats)
        return stats

    TieringOffloadingManager.get_stats = get_stats  # type: ignore[method-assign]


def _manager(llm: Any) -> Any:
    """The scheduler's offloading manager (None without a KV connector)."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    connector = scheduler.connector
    if connector is None:
        return None
    return connector.connector_scheduler.manager


def _reply(**fields: Any) -> None:
    _protocol.write(json.dumps(fields) + "\n")


def _read_commands(commands: queue.Queue[dict[str, Any] | None]) -> None:
    for line in sys.stdin:
        if line.strip():
            commands.put(json.loads(line))
    commands.put(None)  # stdin closed: the test process is gone


def _build(config: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv_transfer = None
    if config.get("tier") is not None:
        extra = {
            "spec_name": "SyncCPUTieringSpec",
            "spec_module_path": "sync_offload",
            "cpu_bytes_to_use": config.get("cpu_bytes", 64 << 20),
            "secondary_tiers": [
                {"type": "PeerSecondaryTier", "module_path": "kvpeer.tier", **config["tier"]}
            ],
        }
        kv_transfer = KVTransferConfig(
            kv_connector="OffloadingConnector",
            kv_role="kv_both",
            engine_id=config["engine_id"],
            kv_connector_extra_config=extra,
        )
    return LLM(
        model=config["model"],
        skip_tokenizer_init=True,
        block_size=32,
        enforce_eager=True,
        dtype="float32",
        max_model_len=config.get("max_model_len", 2048),
        max_num_batched_tokens=config.get("max_model_len", 2048),
        enable_prefix_caching=True,
        kv_transfer_config=kv_transfer,
        seed=0,
    )


class Driver:
    """The engine loop: real requests first, the busy request only when none runs."""

    def __init__(self, llm: Any, counters: Counters) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.manager = _manager(llm)
        self.counters = counters
        self.busy = False
        self._busy_id: str | None = None
        self._seq = 0

    def _take_stats(self) -> None:
        if self.manager is not None:
            self.manager.get_stats()  # through the hook: summed into counters

    def _step(self) -> list[Any]:
        outputs = self.engine.step()
        self._take_stats()
        return outputs

    def _stop_busy(self) -> None:
        if self._busy_id is not None:
            self.engine.abort_request([self._busy_id])
            while self.engine.has_unfinished_requests():
                self._step()
            self._busy_id = None

    def idle_step(self) -> None:
        """Keep the engine stepping on the busy request (or do nothing)."""
        if not self.busy:
            self._stop_busy()
            return
        if self._busy_id is None or not self.engine.has_unfinished_requests():
            self._busy_id = self._add(BUSY_PROMPT, BUSY_TOKENS, None)
        self._step()

    def _add(self, prompt: list[int], max_tokens: int, kv_params: dict[str, Any] | None) -> str:
        from vllm import SamplingParams

        self._seq += 1
        request_id = f"r{self._seq}"
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            extra_args={"kv_transfer_params": kv_params} if kv_params else None,
        )
        self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        return request_id

    def generate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one request alone (the busy request is stopped first) to completion."""
        self._stop_busy()
        before = dict(self.counters.total)
        start = time.perf_counter()
        request_id = self._add(cmd["prompt"], cmd["max_tokens"], cmd.get("kv_transfer_params"))
        ttft = None
        deadline = start + cmd.get("timeout_s", 300)
        while True:
            if time.perf_counter() > deadline:
                self.engine.abort_request([request_id])
                raise TimeoutError(f"request {request_id} did not finish in time")
            for out in self._step():
                if out.request_id != request_id:
                    continue
                if ttft is None and out.outputs and out.outputs[0].token_ids:
                    ttft = time.perf_counter() - start
                if out.finished:
                    for _ in range(3):  # let the stores of its last blocks land
                        self._step()
                    delta = {
                        k: v - before.get(k, 0)
                        for k, v in self.counters.total.items()
                        if v != before.get(k, 0)
                    }
                    return {
                        "tokens": list(out.outputs[0].token_ids),
                        "num_cached_tokens": out.num_cached_tokens,
                        "ttft_s": ttft,
                        "kv_transfer_params": out.kv_transfer_params,
                        "metrics": delta,
                    }


def main() -> None:
    config = json.loads(sys.argv[1])
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    counters = Counters()
    _install_counter_hook(counters)
    llm = _build(config)
    driver = Driver(llm, counters)
    tier = None
    if driver.manager is not None:
        tier = next(t for t in driver.manager.secondary_tiers if t.tier_type == "PeerSecondaryTier")
    import vllm

    _reply(
        event="ready",
        vllm=vllm.__version__,
        endpoint=None if tier is None else str(tier.endpoint),
        node_id=None if tier is None else tier.node_id,
        fingerprint=None if tier is None else tier.fingerprint.digest,
    )
    commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_commands, args=(commands,), daemon=True).start()
    while True:
        try:
            cmd = commands.get(timeout=0 if driver.busy else 0.5)
        except queue.Empty:
            driver.idle_step()
            continue
        if cmd is None or cmd["op"] == "shutdown":
            break
        try:
            if cmd["op"] == "generate":
                _reply(ok=True, **driver.generate(cmd))
            elif cmd["op"] == "metrics":
                driver._take_stats()
                _reply(ok=True, metrics=counters.total)
            elif cmd["op"] == "busy":
                driver.busy = bool(cmd["on"])
                driver.idle_step()
                _reply(ok=True)
            elif cmd["op"] == "reset":
                driver._stop_busy()
                _reply(ok=bool(llm.reset_prefix_cache()))
            else:
                _reply(ok=False, error=f"unknown op {cmd['op']!r}")
        except Exception as exc:  # the test gets the error; the engine stays up
            logging.exception("command failed")
            _reply(ok=False, error=f"{type(exc).__name__}: {exc}")
    driver._stop_busy()
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
