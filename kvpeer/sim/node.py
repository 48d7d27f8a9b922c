"""A simulated vLLM node in its own OS process, controlled over a local socket.

The child process builds vLLM's real stack through the real factory path
(``OffloadingSpecFactory.create_spec`` -> ``TieringOffloadingSpec.get_manager``,
which loads ``PeerSecondaryTier`` from ``module_path: kvpeer.tier`` and maps a
real ``/dev/shm`` primary tier) and drives it with a
:class:`~kvpeer.sim.engine.SchedulerDriver`. The parent sends JSON commands over
a Unix socket (one connection per call, so calls may overlap) and can SIGKILL the
child at any moment — the point of running nodes as processes.

Chunk rows are :func:`kvpeer.sim.rows.keyed_row` of their key, so a node that
loads a chunk checks the bytes against what its holder computed without any row
crossing the control socket.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Client, Listener
from typing import Any

#: Spec names of the model shapes a node can simulate (see kvpeer.sim.vllm_config).
SHAPES = ("tiny", "llama3-8b")
#: Tier methods whose caller-thread cost op_time_tier_calls measures.
TIMED_TIER_CALLS = ("lookup", "submit_load", "serve_external_requests")


@dataclass
class NodeSpec:
    """Everything the child needs to build its vLLM stack."""

    name: str
    #: PeerSecondaryTier keys (``type``/``module_path`` are added).
    tier: dict[str, Any]
    shape: str = "tiny"
    cpu_bytes: int = 64 << 20
    tp_size: int = 1
    canonical_layout: bool = True
    tokens_per_block: int = 16
    blocks_per_chunk: int = 1
    #: What a computed chunk row holds: ``keyed`` (pseudo-random bytes derived from the
    #: key), or ``canonical`` / ``direct``: the row vLLM's TP=``tp_size`` workers would
    #: write for KV derived from the key, in that layout (kvpeer.sim.canonical).
    rows: str = "keyed"
    #: vLLM's --prefix-caching-hash-algo.
    hash_algo: str = "sha256"
    #: Extra environment (e.g. PYTHONHASHSEED).
    env: dict[str, str] = field(default_factory=dict)
    #: Other kv_connector_extra_config keys.
    extra_config: dict[str, Any] = field(default_factory=dict)


class NodeError(RuntimeError):
    """The node answered a command with an error, or could not be reached."""


class NodeProcess:
    """Parent-side handle of one simulated node. Use as a context manager."""

    def __init__(self, spec: NodeSpec, *, log_path: str | None = None) -> None:
        self.spec = spec
        self._dir = tempfile.mkdtemp(prefix=f"kvpeer-node-{spec.name}-")
        self.address = os.path.join(self._dir, "control.sock")
        self._authkey = os.urandom(16)
        self.log_path = log_path or os.path.join(self._dir, "node.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 120.0) -> NodeProcess:
        """Launch the child and wait until it serves (vLLM's import takes seconds)."""
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> NodeProcess:
        """Spawn the child and return at once; call :meth:`wait_ready` next."""
        env = {**os.environ, **self.spec.env, "KVPEER_SIM_AUTHKEY": self._authkey.hex()}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpeer.sim.node", "--control", self.address],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(asdict(self.spec)).encode())
        self.proc.stdin.close()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> NodeProcess:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.address):
            if self.proc.poll() is not None:
                raise NodeError(f"node {self.spec.name} exited at start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise NodeError(
                    f"node {self.spec.name} did not start in {timeout_s}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        while True:  # the socket file exists from bind(); connections work from listen()
            try:
                self.info = self.call("info")
                return self
            except NodeError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return self.info["endpoint"]

    def call(self, op: str, timeout_s: float = 120.0, **args: Any) -> Any:
        """Run command ``op`` in the node and return its result."""
        try:
            with Client(self.address, family="AF_UNIX", authkey=self._authkey) as conn:
                conn.send_bytes(json.dumps({"op": op, "args": args}).encode())
                if not conn.poll(timeout_s):
                    raise NodeError(f"node {self.spec.name}: {op} did not answer in {timeout_s}s")
                reply = json.loads(conn.recv_bytes())
        except (OSError, EOFError) as exc:
            raise NodeError(f"node {self.spec.name} unreachable during {op}: {exc}") from exc
        if "error" in reply:
            raise NodeError(f"node {self.spec.name}: {op} failed: {reply['error']}")
        return reply["result"]

    def kill(self) -> None:
        """SIGKILL the node: no cleanup runs in it (its /dev/shm file is removed here)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        shm = self.info.get("shm_path")
        if shm and os.path.exists(shm):
            os.unlink(shm)
        self._remove_dir()

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Graceful stop: the node shuts its manager down (as vLLM does) and exits."""
        result: dict[str, Any] = {}
        if self.proc is not None and self.proc.poll() is None:
            try:
                result = self.call("shutdown", timeout_s=timeout_s)
                self.proc.wait(timeout=timeout_s)
            except (NodeError, subprocess.TimeoutExpired):
                self.kill()
                raise
        self._remove_dir()
        return result

    def _remove_dir(self) -> None:
        """Remove the control socket's directory (and the log, unless it lives elsewhere)."""
        if self.proc is not None and self.proc.poll() is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except Exception:
            self.kill()


# ---------------------------------------------------------------------------
# Child process
# ---------------------------------------------------------------------------


class _Node:
    """The child's state: vLLM's manager, the driver, and the command handlers."""

    def __init__(self, spec: NodeSpec) -> None:
        from vllm.v1.kv_offload.factory import OffloadingSpecFactory

        from kvpeer.sim import vllm_config
        from kvpeer.sim.engine import SchedulerDriver

        shape = {"tiny": vllm_config.TINY, "llama3-8b": vllm_config.LLAMA3_8B}[spec.shape]
        self.shape = shape
        extra = {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": spec.cpu_bytes,
            "canonical_layout": spec.canonical_layout,
            "secondary_tiers": [
                {"type": "PeerSecondaryTier", "module_path": "kvpeer.tier", **spec.tier}
            ],
            **spec.extra_config,
        }
        self.engine_id = f"kvpeer-sim-{spec.name}-{os.getpid()}"
        config = vllm_config.offloading_config(
            shape,
            extra,
            engine_id=self.engine_id,
            tokens_per_block=spec.tokens_per_block,
            blocks_per_chunk=spec.blocks_per_chunk,
            tp_size=spec.tp_size,
        )
        self.spec = spec
        self.offloading_spec = OffloadingSpecFactory.create_spec(config)
        self.manager = self.offloading_spec.get_manager()
        # What EngineCore does right after building the scheduler (and this tier).
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import init_none_hash

        init_none_hash(get_hash_fn_by_name(spec.hash_algo))
        self.driver = SchedulerDriver(self.manager)
        self.tier = self.manager.secondary_tiers[0]
        self.chunk_bytes = self.tier.block_size_bytes
        self.stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        #: Samples (ns) of the tier calls timed by op_time_tier_calls, once enabled.
        self._call_times: dict[str, list[int]] | None = None

    def _row(self, key: bytes) -> bytes:
        """The row this node computes for ``key`` (see NodeSpec.rows)."""
        if self.spec.rows == "keyed":
            from kvpeer.sim.rows import keyed_row

            return keyed_row(key, self.chunk_bytes)
        from kvpeer.sim import canonical

        geometry = canonical.KVGeometry.of(self.shape, self.spec.tokens_per_block)
        seed = int.from_bytes(key[:8], "big") & ((1 << 63) - 1)
        kv = canonical.random_kv_cache(geometry, self.spec.blocks_per_chunk, seed=seed)
        layout = {"canonical": canonical.canonical_chunk_row, "direct": canonical.direct_chunk_row}
        row = layout[self.spec.rows](
            kv,
            geometry,
            self.spec.tp_size,
            range(self.spec.blocks_per_chunk),
            row_bytes=self.chunk_bytes,
        )
        return row.tobytes()

    # Each op_* takes JSON arguments and returns a JSON-able result.

    def op_info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "endpoint": self.tier.endpoint,
            "node_id": self.tier.node_id,
            "chunk_bytes": self.chunk_bytes,
            "num_chunks": self.manager.primary_tier._num_chunks,
            "fingerprint": self.tier.fingerprint.digest,
            "shm_path": f"/dev/shm/vllm_offload_{self.engine_id}.mmap",
        }

    def op_store(
        self, keys: Sequence[str], params: dict[str, Any] | None = None, req_id: str = ""
    ) -> int:
        """Compute and store chunks without looking anything up (a fresh prefill)."""
        return self.driver.store_request(
            req_id or f"store-{time.monotonic_ns()}",
            [bytes.fromhex(k) for k in keys],
            self._row,
            params,
        )

    def op_request(
        self,
        keys: Sequence[str],
        params: dict[str, Any] | None = None,
        req_id: str = "",
        compute: bool = True,
        timeout_s: float = 60.0,
    ) -> dict[str, Any]:
        """A whole request: look up, load the hit prefix and check it, compute the rest."""
        raw = [bytes.fromhex(k) for k in keys]
        report = self.driver.run_request(
            req_id or f"req-{time.monotonic_ns()}",
            raw,
            params=params,
            compute=self._row if compute else None,
            timeout_s=timeout_s,
        )
        return report.checked(raw, self._row, self.chunk_bytes)

    def op_request_tokens(
        self, tokens: Sequence[int], cache_salt: str | None = None, **request: Any
    ) -> dict[str, Any]:
        """:meth:`op_request` over the chunk keys vLLM computes for ``tokens`` (also returned).

        The keys come from vLLM's own request block hasher (kvpeer.sim.vllm_keys),
        with this node's block size, blocks per chunk and hash algorithm.
        """
        from kvpeer.sim.vllm_keys import vllm_chunk_keys

        keys = vllm_chunk_keys(
            tokens,
            block_size=self.spec.tokens_per_block,
            blocks_per_chunk=self.spec.blocks_per_chunk,
            hash_algo=self.spec.hash_algo,
            cache_salt=cache_salt,
        )
        hexkeys = [k.hex() for k in keys]
        return {**self.op_request(hexkeys, **request), "keys": hexkeys}

    def op_probe_caller_io(
        self, keys: Sequence[str], inbound_keys: Sequence[str]
    ) -> dict[str, Any]:
        """Drive vLLM's calls from a fresh thread between two markers, for a syscall tracer.

        Between the markers (writes of ``kvpeer-probe-begin``/``-end`` to /dev/null) the
        thread runs a whole request over ``keys`` — lookups until settled, promotions
        (submit_load), the load, the store (submit_store) — while a helper thread asks
        this node's own chunk server for ``inbound_keys``, so that steps also serve a
        peer (serve_external_requests). A tracer attached to this process checks that
        neither this thread nor the engine-step thread touched a socket.
        """
        from kvpeer.client.peer import PeerClient
        from kvpeer.sim.engine import END_OF_STEP

        out: dict[str, Any] = {}
        served: dict[str, Any] = {}

        def peer_asks() -> None:
            client = PeerClient(
                self.tier.endpoint,
                node_id="probe",
                fingerprint=self.tier.fingerprint,
                chunk_bytes=self.chunk_bytes,
            )
            with client:
                answer = client.lookup([bytes.fromhex(k) for k in inbound_keys], hold=True)
                served["hits"] = sum(answer.hits)
                client.release(answer.lease_id)

        def probe() -> None:
            out["tid"] = threading.get_native_id()
            with open("/dev/null", "wb", buffering=0) as marker:
                marker.write(b"kvpeer-probe-begin")
                asker = threading.Thread(target=peer_asks)
                asker.start()
                report = self.driver.run_request(
                    f"probe-{time.monotonic_ns()}",
                    [bytes.fromhex(k) for k in keys],
                    compute=self._row,
                )
                while asker.is_alive():
                    with self.manager.lock:
                        self.manager.on_schedule_end(END_OF_STEP)
                    asker.join(0.001)
                marker.write(b"kvpeer-probe-end")
            out["hit_chunks"] = report.hit_chunks

        thread = threading.Thread(target=probe, name="probe-scheduler")
        thread.start()
        thread.join()
        return {
            **out,
            "served_hits": served.get("hits", 0),
            "engine_tid": self.driver.engine_thread_id,
        }

    def op_pinned(self) -> int:
        return self.driver.pinned_chunks()

    def op_tier_state(self) -> dict[str, Any]:
        with self.manager.lock:
            return {
                "pending_work": self.manager.has_pending_work(),
                "jobs": len(self.manager._jobs),
                "open_row_views": self.tier._rows.open_views,
                "published": self.tier._publisher.published_count,
                "open_handoffs": self.tier._handoffs.open_count,
            }

    def op_stats(self) -> dict[str, Any]:
        with self.manager.lock:
            stats = self.manager.get_stats()
        if stats is None:
            return {}
        return {
            name: {",".join(k): v for k, v in values.items()}
            for name, values in stats.data.get("data", {}).items()
        }

    def op_time_tier_calls(self) -> list[str]:
        """Time each call vLLM makes to the tier's :data:`TIMED_TIER_CALLS` from now on.

        Wraps those methods of the tier instance (vLLM calls them through the
        instance) with a nanosecond timer; idempotent. ``kvpeer bench`` uses it for
        the tier's cost on vLLM's calling thread; :meth:`op_tier_call_times` reports.
        """
        if self._call_times is None:
            self._call_times = {name: [] for name in TIMED_TIER_CALLS}
            for name, samples in self._call_times.items():
                setattr(self.tier, name, _timed(getattr(self.tier, name), samples))
        return list(TIMED_TIER_CALLS)

    def op_tier_call_times(self, clear: bool = True) -> dict[str, dict[str, float]]:
        """Per timed method: calls, median, 99th percentile and maximum in microseconds."""
        out: dict[str, dict[str, float]] = {}
        for name, samples in (self._call_times or {}).items():
            ordered = sorted(samples)
            if clear:
                samples.clear()
            if ordered:
                out[name] = {
                    "calls": len(ordered),
                    "median_us": ordered[len(ordered) // 2] / 1000,
                    "p99_us": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] / 1000,
                    "max_us": ordered[-1] / 1000,
                }
        return out

    def op_reset(self) -> bool:
        with self.manager.lock:
            self.manager.reset_cache()
            self.manager.on_reset_flushed()
        return True

    def op_flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the keys this node published have reached the directory."""
        deadline = time.monotonic() + timeout_s
        while self.tier._directory is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the tier joins its directory just after start-up
        directory = self.tier._directory
        return directory is not None and directory.flush(max(0.0, deadline - time.monotonic()))

    def op_served(self) -> dict[str, int]:
        """Chunks and bytes this node's chunk server has streamed so far (cumulative)."""
        stats = self.tier._server.stats()
        return {"chunks": stats["chunks_served"], "bytes": stats["bytes_served"]}

    def op_leases(self) -> dict[str, int]:
        """This node's chunk server leases: live now, and how the others ended (cumulative)."""
        stats = self.tier._server.stats()
        return {
            name: stats[f"leases_{name}"]
            for name in ("live", "created", "released", "expired", "revoked")
        }

    def op_shutdown(self) -> dict[str, Any]:
        """Shut vLLM's manager down (idempotent); the process then exits."""
        with self._shutdown_lock:
            if not self._shut_down:
                self.driver.close()
                self._shut_down = True
        self.stopped.set()
        info = self.op_info()
        return {"shm_left": os.path.exists(info["shm_path"])}


def _timed(method: Any, samples: list[int]) -> Any:
    """``method`` with each call's duration (ns) appended to ``samples``."""

    def timed(*args: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return method(*args)
        finally:
            samples.append(time.perf_counter_ns() - started)

    return timed


def _serve(node: _Node, address: str, authkey: bytes) -> None:
    listener = Listener(address, family="AF_UNIX", authkey=authkey)

    def handle(conn: Any) -> None:
        with conn:
            request = json.loads(conn.recv_bytes())
            try:
                result = getattr(node, f"op_{request['op']}")(**request["args"])
                reply = {"result": result}
            except Exception as exc:  # report to the parent; the node keeps serving
                import traceback

                traceback.print_exc()
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            conn.send_bytes(json.dumps(reply).encode())

    def accept_loop() -> None:
        while not node.stopped.is_set():
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    node.stopped.wait()
    time.sleep(0.2)  # let the shutdown reply go out
    listener.close()


def main() -> None:
    import logging

    parser = argparse.ArgumentParser(description="a simulated vLLM node (internal)")
    parser.add_argument("--control", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = NodeSpec(**json.loads(sys.stdin.read()))
    authkey = bytes.fromhex(os.environ["KVPEER_SIM_AUTHKEY"])
    _die_with_parent()
    node = _Node(spec)
    signal.signal(signal.SIGTERM, lambda *_: node.stopped.set())
    _serve(node, args.control, authkey)
    node.op_shutdown()  # also after SIGTERM: vLLM's shutdown removes the /dev/shm file
    # Everything that matters is released; skip the interpreter's finalization, which
    # spends seconds tearing down gRPC's and torch's globals for nothing.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this node when its parent dies (a demo stopped with SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent's own cleanup has to do


if __name__ == "__main__":
    main()
