"""vLLM 0.33.0's built-in p2p tier (ZMQ control, NIXL/UCX data) between two processes.

:class:`P2PNodeProcess` runs one simulated vLLM node whose secondary tier is
vLLM's own ``{"type": "p2p", "host": ..., "port": ...}``, built through the real
``TieringOffloadingSpec`` factory over a real ``/dev/shm`` primary tier and
driven by :class:`~kvpeer.sim.engine.SchedulerDriver`, exactly like kvpeer's
:class:`~kvpeer.sim.node.NodeProcess` (which is bound to ``PeerSecondaryTier``).
It is driven like vLLM's PD recipe: the producer stores the chunk set under
``remote_decoder``, the consumer runs a request with ``remote_prefiller`` naming
the producer; the consumer's manager answers HIT, promotes, and the producer's
NIXL agent writes the rows into the consumer's primary slots.

UCX is configured by environment (``UCX_TLS=tcp`` and so on), which the child
applies before NIXL creates its agent. Rows are
:func:`kvpeer.sim.rows.keyed_row` of their key, so the consumer checks every
loaded byte without rows crossing the control pipe.

The parent talks to the child over a ``multiprocessing`` pipe with JSON
messages, one command at a time (the benchmark is sequential).
:class:`P2PPair` is a producer and a consumer with one timed handoff.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from kvpeer.api.errors import KVPeerError
from kvpeer.bench.tier import (
    Launcher,
    NodePair,
    Transfer,
    checked_transfer,
    close_concurrently,
    primary_bytes,
    run_here,
    sim_geometry,
)


@dataclass(frozen=True)
class P2PNodeSpec:
    """What the child builds: a model shape's primary tier and the p2p tier's address."""

    name: str
    shape: str = "tiny"
    cpu_bytes: int = 64 << 20
    tokens_per_block: int = 16
    #: Address the ZMQ control socket binds and advertises (vLLM uses it verbatim).
    host: str = "127.0.0.1"
    #: Extra environment applied in the child before vLLM loads (UCX_TLS, ...).
    env: dict[str, str] = field(default_factory=dict)
    #: The child is born in a network namespace (kvpeer.bench.netns): it mounts its
    #: own /sys so that UCX finds the namespace's network devices.
    in_namespace: bool = False
    #: File the child's stdout and stderr (vLLM's and NIXL's logs) go to; None keeps ours.
    log_path: str | None = None


class P2PNodeProcess:
    """Parent-side handle of one p2p node process. Use as a context manager.

    Commands (:meth:`call`): ``info``; ``store(keys, kv_request_id)`` as a PD
    producer; ``request(keys, kv_request_id, producer)`` as the PD consumer of
    ``producer`` (``"host:port"``), returning the timings and the verified and
    wrong chunk counts; ``reset``; ``shutdown``.
    """

    def __init__(self, spec: P2PNodeSpec) -> None:
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_child_main, args=(child, json.dumps(asdict(spec))), daemon=True
        )
        self._child_conn = child
        self.info: dict[str, Any] = {}

    def launch(self) -> P2PNodeProcess:
        """Start the child and return at once (vLLM's import takes seconds)."""
        self._process.start()
        self._child_conn.close()
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> P2PNodeProcess:
        self.info = self._receive("start-up", timeout_s)
        return self

    def start(self, timeout_s: float = 180.0) -> P2PNodeProcess:
        return self.launch().wait_ready(timeout_s)

    @property
    def started(self) -> bool:
        return self._process.pid is not None and self._process.exitcode is None

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    @property
    def address(self) -> str:
        """``host:port`` of the p2p tier's control socket (what a consumer names)."""
        return f"{self.info['host']}:{self.info['port']}"

    def call(self, op: str, timeout_s: float = 300.0, **args: Any) -> Any:
        try:
            self._conn.send_bytes(json.dumps({"op": op, "args": args}).encode())
        except OSError as exc:
            raise KVPeerError(f"p2p node {self.spec.name} is gone ({exc})") from exc
        return self._receive(op, timeout_s)

    def _receive(self, what: str, timeout_s: float) -> Any:
        try:
            if not self._conn.poll(timeout_s):
                raise KVPeerError(f"p2p node {self.spec.name}: {what} took over {timeout_s}s")
            reply = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise KVPeerError(f"p2p node {self.spec.name} died during {what}") from exc
        if "error" in reply:
            raise KVPeerError(f"p2p node {self.spec.name}: {what} failed: {reply['error']}")
        return reply["result"]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the manager down in the child (as vLLM does), then end the process."""
        if self._process.is_alive():
            with contextlib.suppress(KVPeerError):
                self.call("shutdown", timeout_s=timeout_s)
            self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        shm = self.info.get("shm_path")
        if shm and os.path.exists(shm):
            os.unlink(shm)

    def __enter__(self) -> P2PNodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class P2PPair(NodePair):
    """A PD producer (side ``"a"``) and consumer (side ``"b"``) with vLLM's p2p tier.

    ``env`` is both processes' UCX environment (e.g. ``{"UCX_TLS": "tcp"}``); ``hosts``
    and ``launch`` as for :class:`kvpeer.bench.tier.KvpeerPair` (a ``launch``
    means the processes are born in network namespaces); their logs go to
    ``log_dir`` when given.
    """

    def __init__(
        self,
        num_chunks: int,
        chunk_bytes: int,
        *,
        name: str = "p2p",
        env: dict[str, str] | None = None,
        hosts: tuple[str, str] = ("127.0.0.1", "127.0.0.1"),
        launch: Launcher | None = None,
        log_dir: str | None = None,
    ) -> None:
        shape, tokens = sim_geometry(chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self._launch = launch or run_here
        common = {
            "shape": shape,
            "tokens_per_block": tokens,
            "cpu_bytes": primary_bytes(num_chunks, chunk_bytes),
            "env": dict(env or {}),
            "in_namespace": launch is not None,
        }
        self.producer, self.consumer = (
            P2PNodeProcess(
                P2PNodeSpec(
                    f"{name}-{role}",
                    host=host,
                    log_path=os.path.join(log_dir, f"{name}-{role}.log") if log_dir else None,
                    **common,
                )
            )
            for role, host in (("producer", hosts[0]), ("consumer", hosts[1]))
        )

    @property
    def nodes(self) -> tuple[P2PNodeProcess, P2PNodeProcess]:
        return self.producer, self.consumer

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes if node.started]

    def handoff(self, keys: Sequence[str], kv_request_id: str) -> Transfer:
        """The producer stores ``keys`` for ``kv_request_id``; the consumer loads them, timed."""
        stored = self.producer.call("store", keys=list(keys), kv_request_id=kv_request_id)
        if stored != len(keys):
            raise KVPeerError(f"the p2p producer stored {stored} of {len(keys)} chunks")
        self.consumer.call("reset")
        report = self.consumer.call(
            "request",
            timeout_s=600.0,
            keys=list(keys),
            kv_request_id=kv_request_id,
            producer=self.producer.address,
        )
        return checked_transfer(report, len(keys), "vLLM p2p")

    def close(self) -> None:
        """Stop both nodes at once (resumed first)."""
        for node in self.nodes:
            if node.started:
                os.kill(node.pid, signal.SIGCONT)
        close_concurrently(node.stop for node in self.nodes)


# ---------------------------------------------------------------------------
# Child process
# ---------------------------------------------------------------------------


class _P2PNode:
    """The child's vLLM stack and command handlers (each op_* returns JSON-able data)."""

    def __init__(self, spec: P2PNodeSpec) -> None:
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import init_none_hash
        from vllm.v1.kv_offload.factory import OffloadingSpecFactory

        from kvpeer.sim import vllm_config
        from kvpeer.sim.engine import SchedulerDriver

        self.port = _free_port(spec.host)
        self.engine_id = f"kvpeer-bench-p2p-{spec.name}-{os.getpid()}"
        shape = {"tiny": vllm_config.TINY, "llama3-8b": vllm_config.LLAMA3_8B}[spec.shape]
        extra = {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": spec.cpu_bytes,
            "secondary_tiers": [{"type": "p2p", "host": spec.host, "port": self.port}],
        }
        config = vllm_config.offloading_config(
            shape, extra, engine_id=self.engine_id, tokens_per_block=spec.tokens_per_block
        )
        self.spec = spec
        self.manager = OffloadingSpecFactory.create_spec(config).get_manager()
        # What EngineCore does right after building the scheduler; the p2p
        # handshake compares the resulting hash seed.
        init_none_hash(get_hash_fn_by_name("sha256"))
        self.driver = SchedulerDriver(self.manager)
        self.chunk_bytes = self.manager.secondary_tiers[0].block_size_bytes

    def op_info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "host": self.spec.host,
            "port": self.port,
            "chunk_bytes": self.chunk_bytes,
            "num_chunks": self.manager.primary_tier._num_chunks,
            "shm_path": f"/dev/shm/vllm_offload_{self.engine_id}.mmap",
        }

    def _row(self, key: bytes) -> bytes:
        from kvpeer.sim.rows import keyed_row

        return keyed_row(key, self.chunk_bytes)

    def op_store(self, keys: Sequence[str], kv_request_id: str) -> int:
        """A PD producer's prefill: store the chunks, parked for ``kv_request_id``."""
        return self.driver.store_request(
            f"prefill-{kv_request_id}",
            [bytes.fromhex(k) for k in keys],
            self._row,
            {"remote_decoder": {"kv_request_id": kv_request_id}},
        )

    def op_request(
        self, keys: Sequence[str], kv_request_id: str, producer: str, patience_s: float = 120.0
    ) -> dict[str, Any]:
        """The PD consumer's request: load every chunk from ``producer`` and check it."""
        host, port = producer.rsplit(":", 1)
        raw = [bytes.fromhex(k) for k in keys]
        params = {
            "remote_prefiller": {
                "kv_request_id": kv_request_id,
                "remote_host": host,
                "remote_port": int(port),
            }
        }
        report = self.driver.run_request(
            f"decode-{kv_request_id}", raw, params=params, timeout_s=patience_s
        )
        return report.checked(raw, self._row, self.chunk_bytes)

    def op_reset(self) -> bool:
        with self.manager.lock:
            self.manager.reset_cache()
            self.manager.on_reset_flushed()
        return True

    def op_shutdown(self) -> bool:
        self.driver.close()
        return True


def _free_port(host: str) -> int:
    """A port free on ``host`` now (vLLM's p2p tier takes a fixed port, not 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _child_main(conn: Connection, spec_json: str) -> None:
    """Build the node, report its info, then answer commands until ``shutdown``."""
    import logging

    spec = P2PNodeSpec(**json.loads(spec_json))
    if spec.log_path:
        log = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    if spec.in_namespace:
        from kvpeer.bench.netns import mount_own_sysfs

        mount_own_sysfs()
    os.environ.update(spec.env)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    logging.basicConfig(level=logging.WARNING)
    try:
        node = _P2PNode(spec)
        conn.send_bytes(json.dumps({"result": node.op_info()}).encode())
    except Exception as exc:
        conn.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:  # the parent went away: shut down like a stop
            node.op_shutdown()
            return
        started = time.monotonic()
        try:
            reply = {"result": getattr(node, f"op_{request['op']}")(**request["args"])}
        except Exception as exc:
            reply = {
                "error": f"{type(exc).__name__}: {exc} (after {time.monotonic() - started:.1f}s)"
            }
        conn.send_bytes(json.dumps(reply).encode())
        if request["op"] == "shutdown":
            return
