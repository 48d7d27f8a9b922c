"""kvpeer's pull into vLLM's primary tier, between two simulated vLLM node processes.

A :class:`KvpeerPair` is a holder and a consumer
:class:`~kvpeer.sim.node.NodeProcess` — each vLLM's real
``TieringOffloadingManager`` with ``PeerSecondaryTier`` over ``/dev/shm`` — with
the holder among the consumer's static ``peers``. Two ways to move a chunk set:

- :meth:`KvpeerPair.pull_prefix` (setting ``kvpeer``): the holder has the chunks;
  the consumer runs a request over their keys with no parameters (plain prefix
  reuse: RETRY, a batched Lookup that pins them, HIT, promotion pulls them);
- :meth:`KvpeerPair.pull_handoff` (setting ``kvpeer-pd``): the PD flow with the
  parameters vLLM's p2p tier uses (``remote_decoder`` on the holder's store,
  ``remote_prefiller`` on the consumer's request), for a like-for-like
  comparison with :mod:`kvpeer.bench.p2p`.

The time is the consumer's ``lookup_s``: from its first lookup until every chunk
is HIT, i.e. loaded into its primary tier. The node then reads the rows back
and compares them with what the holder computed (outside the timer).

:func:`sim_geometry` picks the model shape and block size that give a chunk of
the requested size, so the p2p nodes use the same rows.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvpeer.api.errors import KVPeerError
from kvpeer.sim.node import NodeProcess, NodeSpec
from kvpeer.sim.vllm_config import LLAMA3_8B, TINY

#: Spare primary rows beyond the chunk set, for the rows a store or load allocates.
SPARE_CHUNKS = 8


@dataclass(frozen=True)
class Transfer:
    """One timed move of a chunk set into a consumer's primary tier."""

    seconds: float
    nbytes: int
    verified_chunks: int

    @property
    def gbps(self) -> float:
        """GB/s (10^9 bytes per second)."""
        return self.nbytes / self.seconds / 1e9


def sim_geometry(chunk_bytes: int) -> tuple[str, int]:
    """(shape name, tokens per block) of a simulated node whose chunk is ``chunk_bytes``.

    Llama-3-8B (128 KiB of KV per token) when the size is a whole number of its
    tokens, else the tiny test shape (128 B per token). One block per chunk.

    Raises:
        ValueError: the size is not a multiple of 128 bytes.
    """
    for name, shape in (("llama3-8b", LLAMA3_8B), ("tiny", TINY)):
        per_token = shape.kv_bytes_per_token()
        if chunk_bytes % per_token == 0 and chunk_bytes >= per_token:
            return name, chunk_bytes // per_token
    raise ValueError(f"a chunk of {chunk_bytes} bytes is not a multiple of 128 bytes")


def primary_bytes(num_chunks: int, chunk_bytes: int) -> int:
    """cpu_bytes_to_use of a node that holds the chunk set plus :data:`SPARE_CHUNKS`."""
    return (num_chunks + SPARE_CHUNKS) * chunk_bytes


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (call it where the server will bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


#: Runs a callable on side "a" or "b" (e.g. :meth:`kvpeer.bench.netns.VethLink.run_in`).
Launcher = Callable[[str, Callable[[], Any]], Any]


def run_here(_side: str, fn: Callable[[], Any]) -> Any:
    """The :data:`Launcher` of a benchmark without namespaces: call ``fn`` here."""
    return fn()


_Pair = TypeVar("_Pair", bound="NodePair")


class NodePair:
    """Two node processes, one per side (``"a"`` sends, ``"b"`` receives), for timed moves.

    What :class:`KvpeerPair` and :class:`kvpeer.bench.p2p.P2PPair` share: launching
    each node on its side (through ``self._launch``), waiting until both are ready,
    and pausing both (SIGSTOP) while other settings are measured. Subclasses set
    ``chunk_bytes`` and ``_launch`` and provide :attr:`nodes` and :attr:`pids`.
    """

    chunk_bytes: int
    _launch: Launcher

    @property
    def nodes(self) -> tuple[Any, Any]:
        """The side-a and side-b node processes (each with ``launch``, ``wait_ready``, ``info``)."""
        raise NotImplementedError

    @property
    def pids(self) -> list[int]:
        """Process ids of the nodes that have started."""
        raise NotImplementedError

    def launch(self: _Pair) -> _Pair:
        """Start both processes (each on its side) and return at once."""
        first, second = self.nodes
        self._launch("a", first.launch)
        self._launch("b", second.launch)
        return self

    def wait_ready(self: _Pair, timeout_s: float = 300.0) -> _Pair:
        """Wait for both nodes; KVPeerError if their chunks are not ``chunk_bytes``."""
        for node in self.nodes:
            node.wait_ready(timeout_s)
        got = self.nodes[1].info["chunk_bytes"]
        if got != self.chunk_bytes:
            raise KVPeerError(f"the nodes' chunks are {got} bytes, not {self.chunk_bytes}")
        return self

    def pause(self) -> None:
        """SIGSTOP both processes, so that they take no CPU while others are measured."""
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)


class KvpeerPair(NodePair):
    """A holder node and a consumer node with ``PeerSecondaryTier``.

    ``host`` is the address both bind (in a network namespace: the namespace's
    own address). ``launch`` runs a callable on side ``"a"`` (holder) or ``"b"``
    (consumer) — :meth:`kvpeer.bench.netns.VethLink.run_in` puts each node in
    its namespace; None runs both here. ``tier`` adds tier keys to both.
    """

    def __init__(
        self,
        num_chunks: int,
        chunk_bytes: int,
        *,
        hosts: tuple[str, str] = ("127.0.0.1", "127.0.0.1"),
        launch: Launcher | None = None,
        tier: dict[str, Any] | None = None,
        log_dir: str | None = None,
    ) -> None:
        shape, tokens = sim_geometry(chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self._launch = launch or run_here
        holder_port = self._launch("a", lambda: free_port(hosts[0]))
        self.holder_endpoint = f"{hosts[0]}:{holder_port}"
        common = {
            "shape": shape,
            "tokens_per_block": tokens,
            "cpu_bytes": primary_bytes(num_chunks, chunk_bytes),
            "env": {"PYTHONHASHSEED": "0"},
        }
        extra = dict(tier or {})
        # Generous deadlines: a loaded 2-core machine must not turn a slow run into misses.
        patience = {"lookup_timeout_s": 60.0, "handoff_wait_s": 60.0, "pull_timeout_s": 600.0}
        self.holder = NodeProcess(
            NodeSpec(
                "bench-holder", {"listen": self.holder_endpoint, **patience, **extra}, **common
            ),
            log_path=os.path.join(log_dir, "kvpeer-holder.log") if log_dir else None,
        )
        self.consumer = NodeProcess(
            NodeSpec(
                "bench-consumer",
                {
                    "listen": f"{hosts[1]}:0",
                    "peers": [self.holder_endpoint],
                    **patience,
                    **extra,
                },
                **common,
            ),
            log_path=os.path.join(log_dir, "kvpeer-consumer.log") if log_dir else None,
        )

    @property
    def nodes(self) -> tuple[NodeProcess, NodeProcess]:
        return self.holder, self.consumer

    @property
    def pids(self) -> list[int]:
        return [node.proc.pid for node in self.nodes if node.proc is not None]

    def store(self, keys: Sequence[str], params: dict[str, Any] | None = None) -> None:
        """The holder computes and stores the chunks ``keys`` (hex)."""
        stored = self.holder.call("store", keys=list(keys), params=params)
        if stored != len(keys):
            raise KVPeerError(f"the holder stored {stored} of {len(keys)} chunks")

    def pull_prefix(self, keys: Sequence[str]) -> Transfer:
        """Setting ``kvpeer``: the consumer finds the stored chunks at its peer and loads them."""
        return self._request(keys, None)

    def pull_handoff(self, keys: Sequence[str], handoff_id: str) -> Transfer:
        """Setting ``kvpeer-pd``: the holder produces ``keys`` for the consumer, which loads them."""
        self.store(keys, {"remote_decoder": {"kv_request_id": handoff_id}})
        host, port = self.holder_endpoint.rsplit(":", 1)
        params = {
            "remote_prefiller": {
                "kv_request_id": handoff_id,
                "remote_host": host,
                "remote_port": int(port),
            }
        }
        return self._request(keys, params)

    def _request(self, keys: Sequence[str], params: dict[str, Any] | None) -> Transfer:
        self.consumer.call("reset")  # nothing of an earlier repetition stays in its primary
        report = self.consumer.call(
            "request", timeout_s=600.0, keys=list(keys), params=params, compute=False
        )
        return checked_transfer(report, len(keys), "kvpeer")

    def close(self) -> None:
        """Stop both nodes at once (resumed first); kill whichever does not stop cleanly."""
        close_concurrently(lambda node=node: _stop_node(node) for node in self.nodes)


def _stop_node(node: NodeProcess) -> None:
    if node.proc is None or node.proc.poll() is not None:
        return
    os.kill(node.proc.pid, signal.SIGCONT)
    try:
        node.stop(timeout_s=30)
    except Exception:
        node.kill()


def close_concurrently(closers: Iterable[Callable[[], None]]) -> None:
    """Run every closer in its own thread and wait for all (a node takes seconds to stop).

    Raises the first closer's exception, after all have finished.
    """
    errors: list[BaseException] = []

    def run(closer: Callable[[], None]) -> None:
        try:
            closer()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(closer,)) for closer in closers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def checked_transfer(report: dict[str, Any], num_chunks: int, what: str) -> Transfer:
    """A node's request report as a :class:`Transfer`, after checking every chunk arrived intact.

    Raises:
        KVPeerError: a chunk was missed or arrived with wrong bytes.
    """
    if report["wrong_chunks"]:
        raise KVPeerError(f"{what}: {len(report['wrong_chunks'])} chunks arrived with wrong bytes")
    if report["verified_chunks"] != num_chunks:
        raise KVPeerError(
            f"{what}: only {report['verified_chunks']} of {num_chunks} chunks were loaded"
        )
    return Transfer(report["lookup_s"], report["bytes_loaded"], report["verified_chunks"])
