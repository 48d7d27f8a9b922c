"""``kvpeer demo``: kvpeer doing its whole job on one machine, without a GPU.

A directory and four simulated vLLM nodes run as separate processes. Each node
is vLLM's real ``TieringOffloadingManager`` with ``PeerSecondaryTier`` over a
real shared-memory primary tier (kvpeer.sim), with KV shaped like Llama-3-8B
(32 layers, 8 KV heads of 128, bf16: 2 MiB per 16-token chunk). Nodes fill their
rows the way vLLM's GPU workers would for their tensor-parallel size, in vLLM's
canonical layout (kvpeer.sim.canonical runs vLLM's own page mappings), and
check every row they load against the row they would have computed themselves.

1. PD handoff: the prefill node (TP=2) prefills a long prompt as a producer; the
   decode node (TP=1) pulls its KV instead of recomputing it.
2. Prefix reuse: the decode node has answered a request with a long system
   prompt; a third node gets another question with the same system prompt and
   finds the prefix through the directory.
3. Cross-TP reuse: the third node (TP=1) reuses a document the prefill node
   (TP=2) has read: canonical bytes are the same for both.
4. A failure: a node holding a prompt dies (SIGKILL) while the third node pulls
   from it; the pull keeps what arrived whole and verified, vLLM recomputes the
   rest, nothing wrong is loaded.

Why hand-written output, not ``rich`` (issue 14; also for ``kvpeer bench``'s and
``kvpeer inspect``'s tables): the output is a few aligned f-string lines that
must read the same in a CI log with no TTY as on a terminal. ``rich`` adds
box-drawing and colour codes, and without a TTY it sizes tables to a default
width of 80 columns and wraps or truncates wider rows, so the output would
change; ``rich`` is also not a kvpeer dependency (vLLM brings it, the directory
and proxy installs do not) and costs 35-46 ms of import (measured here). No speed
is at stake beyond that.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from kvpeer.sim.directory import DirectoryProcess
from kvpeer.sim.node import NodeProcess, NodeSpec
from kvpeer.sim.relay import Faults, Relay
from kvpeer.sim.rows import prefix_keys

TOKENS_PER_CHUNK = 16


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults fit a 2-core, 24 GiB machine in about a minute."""

    shape: str = "llama3-8b"
    prompt_tokens: int = 4096
    system_tokens: int = 2048
    question_tokens: int = 256
    document_tokens: int = 2048
    failure_tokens: int = 4096
    #: Primary-tier size of each node.
    node_mib: int = 1280
    #: Throughput of the link to the node that dies, so it dies mid-pull for sure.
    failing_link_mb_s: float = 400.0
    #: Fraction of the doomed node's prompt streamed when it is killed.
    kill_at: float = 0.4
    #: The tiers' ``same_host`` (``auto``: nodes on this machine copy each other's rows
    #: from /dev/shm; ``off``: over TCP). The doomed node, behind its slow relay,
    #: stands for a remote node and always uses the network.
    same_host: str = "auto"

    @classmethod
    def quick(cls) -> DemoSettings:
        """Small prompts for a smoke test (seconds once the nodes are up)."""
        return cls(
            prompt_tokens=256,
            system_tokens=128,
            question_tokens=32,
            document_tokens=128,
            failure_tokens=512,
            node_mib=192,
            failing_link_mb_s=40.0,
        )


@dataclass
class StepResult:
    name: str
    route: str
    expected_chunks: int
    loaded_chunks: int = 0
    verified_chunks: int = 0
    wrong_chunks: int = 0
    recomputed_chunks: int = 0
    bytes_loaded: int = 0
    seconds: float = 0.0
    note: str = ""
    #: The step shows a failure: loading less than everything is expected.
    partial_ok: bool = False

    @property
    def ok(self) -> bool:
        complete = self.partial_ok or self.loaded_chunks == self.expected_chunks
        return complete and self.wrong_chunks == 0 and self.verified_chunks == self.loaded_chunks


@dataclass
class _Cluster:
    directory: DirectoryProcess
    prefill: NodeProcess
    decode: NodeProcess
    reuse: NodeProcess
    doomed: NodeProcess
    relay: Relay
    nodes: list[NodeProcess] = field(default_factory=list)


def run(settings: DemoSettings, out: TextIO = sys.stdout) -> int:
    """Run the demo; return 0 if every loaded row was byte-exact, else 1."""
    say = _Printer(out)
    say.line("kvpeer demo: a directory and four vLLM nodes on this machine, sharing KV over gRPC")
    say.line(
        f"KV shaped like {'Llama-3-8B' if settings.shape == 'llama3-8b' else settings.shape}, "
        f"{TOKENS_PER_CHUNK} tokens per chunk, canonical layout, every loaded row byte-checked"
    )
    results: list[StepResult] = []
    with contextlib.ExitStack() as stack:
        cluster = _start(settings, stack, say)
        steps: list[Callable[[_Cluster, DemoSettings, _Printer], StepResult]] = [
            _pd_handoff,
            _prefix_reuse,
            _cross_tp,
            _holder_dies,
        ]
        consumers = {
            _pd_handoff: cluster.decode,
            _prefix_reuse: cluster.reuse,
            _cross_tp: cluster.reuse,
            _holder_dies: cluster.reuse,
        }
        for step in steps:
            consumers[step].call("stats")  # count this step's rows only
            result = step(cluster, settings, say)
            path = _path_note(consumers[step])
            result.note = f"{path}; {result.note}" if result.note and path else path or result.note
            results.append(result)
        say.line("stopping the nodes and the directory")
    say.line("")
    say.table(results)
    failed = [r for r in results if not r.ok]
    if failed:
        say.line(f"FAILED: {', '.join(r.name for r in failed)}")
        return 1
    say.line("all loaded rows were byte-exact; no process or /dev/shm file is left behind")
    return 0


def _start(settings: DemoSettings, stack: contextlib.ExitStack, say: _Printer) -> _Cluster:
    directory = stack.enter_context(DirectoryProcess(["--lease-ttl", "5"], metrics=False))
    tier = {
        "directory": directory.endpoint,
        "listen": "127.0.0.1:0",
        "same_host": settings.same_host,
    }
    cpu = settings.node_mib << 20
    doomed_port = _free_port()
    relay = stack.enter_context(
        Relay(
            f"127.0.0.1:{doomed_port}",
            down=Faults(rate_bytes_per_s=settings.failing_link_mb_s * 1e6),
        )
    )
    common = {
        "shape": settings.shape,
        "cpu_bytes": cpu,
        "rows": "canonical",
        "env": {"PYTHONHASHSEED": "0"},
    }
    nodes = {
        "prefill": NodeSpec("prefill", dict(tier), tp_size=2, **common),
        "decode": NodeSpec("decode", dict(tier), tp_size=1, **common),
        "reuse": NodeSpec("reuse", dict(tier), tp_size=1, **common),
        "doomed": NodeSpec(
            "doomed",
            {
                **tier,
                "listen": f"127.0.0.1:{doomed_port}",
                "advertise": relay.endpoint,
                "same_host": "off",  # reached through the slow relay, like a remote node
            },
            tp_size=1,
            **common,
        ),
    }
    processes = {name: NodeProcess(spec) for name, spec in nodes.items()}
    for process in processes.values():
        stack.callback(_stop, process)
        process.launch()
    with say.spinner("starting the vLLM nodes (each imports vLLM and maps its primary tier)"):
        for process in processes.values():
            process.wait_ready()
    for name, process in processes.items():
        info = process.info
        say.line(
            f"  {name:<8} TP={nodes[name].tp_size}  {process.endpoint:<16} "
            f"{info['num_chunks']} chunks of {info['chunk_bytes'] >> 10} KiB  "
            f"fingerprint {info['fingerprint'][:12]}"
        )
    return _Cluster(directory, relay=relay, **processes)


# -- the steps ----------------------------------------------------------------


def _pd_handoff(c: _Cluster, s: DemoSettings, say: _Printer) -> StepResult:
    keys = _keys(("pd-prompt", s.prompt_tokens))
    handoff = f"demo-{uuid.uuid4().hex[:8]}"
    say.step(1, f"PD handoff: prefill (TP=2) computes a {s.prompt_tokens}-token prompt as producer")
    c.prefill.call(
        "request", keys=keys, params={"kvpeer": {"handoff_id": handoff, "role": "producer"}}
    )
    say.line(f"  decode (TP=1) pulls handoff {handoff} from {c.prefill.endpoint}")
    params = {"kvpeer": {"handoff_id": handoff, "role": "consumer", "source": c.prefill.endpoint}}
    with say.progress(_served(c.prefill), len(keys), c.prefill.info["chunk_bytes"]):
        report = c.decode.call("request", keys=keys, params=params)
    return _result("PD handoff", "prefill TP=2 -> decode TP=1", keys, report)


def _prefix_reuse(c: _Cluster, s: DemoSettings, say: _Printer) -> StepResult:
    system = ("system-prompt", s.system_tokens)
    first = _keys(system, ("question-1", s.question_tokens))
    second = _keys(system, ("question-2", s.question_tokens))
    say.step(
        2, f"prefix reuse: decode answers a question after a {s.system_tokens}-token system prompt"
    )
    c.decode.call("request", keys=first)
    c.decode.call("flush")
    say.line(
        "  reuse asks another question with the same system prompt; the directory points at decode"
    )
    shared = s.system_tokens // TOKENS_PER_CHUNK
    with say.progress(_served(c.decode), shared, c.decode.info["chunk_bytes"]):
        report = c.reuse.call("request", keys=second)
    result = _result("prefix reuse", "decode -> reuse (directory)", second[:shared], report)
    result.note = f"{report['stored_chunks']} question chunks computed"
    return result


def _cross_tp(c: _Cluster, s: DemoSettings, say: _Printer) -> StepResult:
    keys = _keys(("document", s.document_tokens))
    say.step(3, f"cross-TP reuse: prefill (TP=2) reads a {s.document_tokens}-token document")
    c.prefill.call("request", keys=keys)
    c.prefill.call("flush")
    say.line(
        "  reuse (TP=1) reads it too and checks every row against its own TP=1 canonical bytes"
    )
    with say.progress(_served(c.prefill), len(keys), c.prefill.info["chunk_bytes"]):
        report = c.reuse.call("request", keys=keys)
    return _result("cross-TP reuse", "prefill TP=2 -> reuse TP=1", keys, report)


def _holder_dies(c: _Cluster, s: DemoSettings, say: _Printer) -> StepResult:
    keys = _keys(("doomed-prompt", s.failure_tokens))
    chunk_bytes = c.doomed.info["chunk_bytes"]
    say.step(4, f"failure: the doomed node holds a {s.failure_tokens}-token prompt; reuse pulls it")
    c.doomed.call("request", keys=keys)
    c.doomed.call("flush")
    kill_bytes = int(s.kill_at * len(keys) * chunk_bytes)
    report: dict[str, Any] = {}
    pulling = threading.Thread(target=lambda: report.update(c.reuse.call("request", keys=keys)))
    # Count what reached the consumer (the relay), not what the holder queued to send.
    delivered = lambda: c.relay.bytes_down  # noqa: E731
    with say.progress(delivered, len(keys), chunk_bytes):
        pulling.start()
        deadline = time.monotonic() + 120
        while delivered() < kill_bytes and pulling.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        c.doomed.kill()
    say.line(f"  SIGKILLed the doomed node after {delivered() / 2**20:.1f} MiB had reached reuse")
    pulling.join(timeout=180)
    result = _result("holder dies", "doomed -> reuse, killed", keys, report)
    result.partial_ok = True
    result.note = f"{report.get('stored_chunks', 0)} chunks recomputed"
    return result


# -- helpers --------------------------------------------------------------------


def _keys(*segments: tuple[str, int]) -> list[str]:
    return [
        k.hex()
        for k in prefix_keys([(name, tokens // TOKENS_PER_CHUNK) for name, tokens in segments])
    ]


def _result(name: str, route: str, expected: list[str], report: dict[str, Any]) -> StepResult:
    loaded = report.get("hit_chunks", 0)
    return StepResult(
        name=name,
        route=route,
        expected_chunks=len(expected),
        loaded_chunks=loaded,
        verified_chunks=report.get("verified_chunks", 0),
        wrong_chunks=len(report.get("wrong_chunks", [])),
        recomputed_chunks=report.get("stored_chunks", 0),
        bytes_loaded=report.get("bytes_loaded", 0),
        seconds=report.get("lookup_s", 0.0) + report.get("load_s", 0.0),
    )


def _path_note(consumer: NodeProcess) -> str:
    """How the consumer's rows of the last step moved: same-host copy, network, or both."""
    stats = consumer.call("stats").get("vllm:kvpeer_pulled_chunks_by_path", {})
    same = sum(v for labels, v in stats.items() if "same_host" in labels)
    network = sum(v for labels, v in stats.items() if "network" in labels)
    if same and network:
        return f"{same:.0f} same-host + {network:.0f} network"
    return "same-host copy" if same else ("network" if network else "")


def _served(holder: NodeProcess) -> Callable[[], int]:
    """Bytes the holder's chunk server has streamed so far."""
    return lambda: holder.call("served", timeout_s=5)["bytes"]


def _stop(process: NodeProcess) -> None:
    try:
        if process.proc is not None and process.proc.poll() is None:
            process.stop(timeout_s=60)
    except Exception:
        process.kill()
    finally:
        process.kill()  # no-op when stopped; removes a killed node's /dev/shm file


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Printer:
    """Output for a terminal (live progress) or a log (plain lines)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty() and os.environ.get("TERM") != "dumb"

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, number: int, text: str) -> None:
        self.line(f"\n[{number}/4] {text}")

    @contextlib.contextmanager
    def spinner(self, text: str) -> Iterator[None]:
        started = time.monotonic()
        self.line(f"{text} ...")
        yield
        self.line(f"  ready in {time.monotonic() - started:.1f}s")

    @contextlib.contextmanager
    def progress(self, counter: Callable[[], int], chunks: int, chunk_bytes: int) -> Iterator[None]:
        """Show the bytes ``counter`` reports moving while the body runs."""
        total = chunks * chunk_bytes
        base = counter()
        stop = threading.Event()
        started = time.monotonic()
        moved = [0]

        def show() -> None:
            while not stop.wait(0.1):
                try:
                    done = counter() - base
                except Exception:
                    return  # the holder is gone
                if done == moved[0]:
                    continue
                moved[0] = done
                if self.live:
                    elapsed = max(time.monotonic() - started, 1e-6)
                    bar = "#" * int(30 * min(done, total) / total)
                    print(
                        f"\r  [{bar:<30}] {_size(done)} / {_size(total)}  {done / elapsed / 1e9:5.2f} GB/s",
                        end="",
                        file=self.out,
                        flush=True,
                    )

        watcher = threading.Thread(target=show, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join(5)
            with contextlib.suppress(Exception):
                moved[0] = counter() - base
            if self.live:
                print(file=self.out, flush=True)
            else:
                self.line(f"  streamed {_size(moved[0])}")

    def table(self, results: list[StepResult]) -> None:
        header = ("step", "route", "tokens", "moved", "time s", "GB/s", "verified", "notes")
        rows = [header]
        for r in results:
            gbps = r.bytes_loaded / r.seconds / 1e9 if r.seconds else 0.0
            rows.append(
                (
                    r.name,
                    r.route,
                    f"{r.loaded_chunks * TOKENS_PER_CHUNK}/{r.expected_chunks * TOKENS_PER_CHUNK}",
                    _size(r.bytes_loaded),
                    f"{r.seconds:.2f}",
                    f"{gbps:.2f}",
                    f"{r.verified_chunks}/{r.loaded_chunks} ok"
                    + (f", {r.wrong_chunks} WRONG" if r.wrong_chunks else ""),
                    r.note,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for i, row in enumerate(rows):
            self.line(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
            if i == 0:
                self.line("  ".join("-" * w for w in widths))
