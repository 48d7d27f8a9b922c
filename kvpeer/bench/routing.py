"""``kvpeer bench --routing``: round-robin against prefix routing on a trace with shared prefixes.

The trace (:func:`make_trace`, seeded): a few hundred system prompts of 4 to 16
chunks, picked by a Zipf law, each starting multi-turn sessions; a request is a
session's system prompt, its history and a new user turn, as token ids. Every
policy replays the same trace through the same :class:`~kvpeer.proxy.routing.Router`
the proxy uses, against a fresh ``kvpeer directory`` process and fresh simulated
vLLM nodes (:mod:`kvpeer.sim`: vLLM's real offloading manager with the real tier,
keys computed by vLLM's own request block hasher in the node), with primary tiers
small enough that where a prefix is kept matters. Requests run one at a time.

Reported per policy: prefix-cache hit rate (chunks loaded locally or pulled from a
peer, over all full chunks), bytes pulled from peers (what the chunk servers
streamed), chunks computed, chunks *recomputed* (computed although some node had
computed them before: the waste routing can avoid), and routing overhead per
request (keys, Directory.Score, decision: p50/p99). Then the routing overhead of a
4,096-chunk prompt against a memory and a Redis directory holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.keys import KeySpec
from kvpeer.api.limits import MAX_KEYS_PER_CALL
from kvpeer.bench.tier import free_port
from kvpeer.proxy.routing import RoutePolicy, Router, parse_node_ref
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.sim.node import NodeProcess, NodeSpec
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc

BLOCK = 16
SEED = "4242"  # PYTHONHASHSEED must be an integer


@dataclass(frozen=True)
class TraceConfig:
    requests: int = 600
    system_prompts: int = 300
    zipf_s: float = 1.1
    min_system_chunks: int = 4
    max_system_chunks: int = 16
    #: Chance a request continues an open session rather than starting one.
    follow_up: float = 0.5
    seed: int = 1


def make_trace(config: TraceConfig) -> list[list[int]]:
    """Token-id prompts: Zipf-popular system prompts, sessions growing turn by turn."""
    rng = random.Random(config.seed)
    systems = [
        [
            rng.randrange(1, 50_000)
            for _ in range(BLOCK * rng.randint(config.min_system_chunks, config.max_system_chunks))
        ]
        for _ in range(config.system_prompts)
    ]
    weights = [1 / (rank + 1) ** config.zipf_s for rank in range(config.system_prompts)]
    sessions: list[list[int]] = []
    trace = []
    for _ in range(config.requests):
        if sessions and rng.random() < config.follow_up:
            index = rng.randrange(len(sessions))
            prompt = sessions[index]
        else:
            prompt = list(rng.choices(systems, weights)[0])
            sessions.append(prompt)
            sessions[:] = sessions[-64:]  # sessions end
            index = len(sessions) - 1
        turn = [rng.randrange(1, 50_000) for _ in range(rng.randint(8, 40))]
        prompt = prompt + turn
        trace.append(prompt)
        reply = [rng.randrange(1, 50_000) for _ in range(rng.randint(8, 40))]
        sessions[index] = prompt + reply
    return trace


@dataclass
class PolicyResult:
    policy: str
    chunks: int = 0
    hits: int = 0
    peer_chunks: int = 0
    peer_bytes: int = 0
    computed: int = 0
    recomputed: int = 0
    overhead_s: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        ordered = sorted(self.overhead_s)
        return {
            "policy": self.policy,
            "hit_rate": self.hits / max(1, self.chunks),
            "local_hits": self.hits - self.peer_chunks,
            "peer_hits": self.peer_chunks,
            "bytes_pulled": self.peer_bytes,
            "computed": self.computed,
            "recomputed": self.recomputed,
            "route_p50_ms": _pct(ordered, 50) * 1000,
            "route_p99_ms": _pct(ordered, 99) * 1000,
            "reasons": self.reasons,
        }


def _pct(ordered: Sequence[float], p: int) -> float:
    return ordered[min(len(ordered) - 1, len(ordered) * p // 100)] if ordered else 0.0


def _start_nodes(directory: DirectoryProcess, count: int, cpu_bytes: int, log_dir: str):
    nodes = [
        NodeProcess(
            NodeSpec(
                f"n{i}",
                {"listen": "127.0.0.1:0", "directory": directory.endpoint, "same_host": "off"},
                cpu_bytes=cpu_bytes,
                env={"PYTHONHASHSEED": SEED},
            ),
            log_path=f"{log_dir}/n{i}.log",
        )
        for i in range(count)
    ]
    for node in nodes:
        node.launch()
    for node in nodes:
        node.wait_ready()
    return nodes


def run_policy(
    policy: RoutePolicy, trace: list[list[int]], *, nodes: int, cpu_bytes: int, log_dir: str
) -> PolicyResult:
    """Replay ``trace`` with ``policy`` on a fresh directory and fresh nodes."""
    result = PolicyResult(policy.value)
    with contextlib.ExitStack() as stack:
        directory = DirectoryProcess(["--lease-ttl", "10"])
        stack.callback(directory.close)
        procs = _start_nodes(directory, nodes, cpu_bytes, log_dir)
        for proc in procs:
            stack.callback(proc.kill)
        for proc in procs:
            proc.call("flush")
        spec = KeySpec(BLOCK, seed=SEED)
        backends = [(f"http://{p.spec.name}", parse_node_ref(p.endpoint, key="n")) for p in procs]
        computed_ever: set[str] = set()

        async def replay() -> None:
            router = Router.create(
                policy, backends, backends, directory=directory.endpoint, timeout_s=0.05, keys=spec
            )
            try:
                for tokens in trace:
                    decision = await router.route({"prompt": tokens})
                    result.overhead_s.append(decision.seconds)
                    reason = decision.decode.reason
                    result.reasons[reason] = result.reasons.get(reason, 0) + 1
                    node = procs[decision.decode.index]
                    answer = await asyncio.to_thread(node.call, "request_tokens", tokens=tokens)
                    if answer["wrong_chunks"]:
                        raise RuntimeError(f"{node.spec.name} loaded wrong rows")
                    keys = answer["keys"]
                    result.chunks += len(keys)
                    result.hits += answer["hit_chunks"]
                    fresh = keys[answer["hit_chunks"] :]
                    result.computed += len(fresh)
                    result.recomputed += sum(1 for k in fresh if k in computed_ever)
                    computed_ever.update(fresh)
                    await asyncio.to_thread(node.call, "flush")  # published before the next
            finally:
                await router.close()

        asyncio.run(replay())
        for proc in procs:
            served = proc.call("served")
            result.peer_chunks += served["chunks"]
            result.peer_bytes += served["bytes"]
        for proc in procs:
            proc.stop()
    return result


def long_prompt_overhead(store: str, *, repeat: int = 200) -> dict[str, float]:
    """Routing overhead of a 4,096-chunk prompt held by one of 4 nodes (warm key cache)."""
    spec = KeySpec(BLOCK, seed=SEED)
    tokens = [random.Random(9).randrange(1, 50_000) for _ in range(BLOCK * MAX_KEYS_PER_CALL)]
    keys = spec.chunk_keys(tokens)
    fp = Fingerprint.of(model="bench", dtype="float16", tokens_per_hash=BLOCK)
    with contextlib.ExitStack() as stack:
        args = ["--lease-ttl", "60"]
        if store == "redis":
            redis_bin = shutil.which("redis-server")
            if redis_bin is None:
                return {}
            port = free_port("127.0.0.1")
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            redis = subprocess.Popen(
                [redis_bin, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
                stdout=subprocess.DEVNULL,
            )
            stack.callback(redis.wait)
            stack.callback(redis.terminate)
            time.sleep(0.3)
            args += ["--store", f"redis://127.0.0.1:{port}/0"]
        directory = DirectoryProcess(args)
        stack.callback(directory.close)
        import grpc

        with grpc.insecure_channel(directory.endpoint) as channel:
            stub = directory_pb2_grpc.DirectoryStub(channel)
            for i in range(4):
                node = f"n{i}:7601"
                epoch = stub.Join(
                    pb.JoinRequest(node_id=node, endpoint=node, fingerprint=fp.to_proto())
                ).epoch
                held = keys if i == 2 else keys[: 512 * i]
                for start in range(0, len(held), 1024):
                    stub.Publish(
                        pb.PublishRequest(
                            node_id=node, epoch=epoch, keys=held[start : start + 1024]
                        )
                    )
        backends = [(f"http://n{i}", parse_node_ref(f"n{i}:7601", key="n")) for i in range(4)]

        async def measure() -> list[float]:
            router = Router.create(
                RoutePolicy.PREFIX,
                backends,
                backends,
                directory=directory.endpoint,
                timeout_s=0.5,
                keys=spec,
            )
            try:
                await router.route({"prompt": tokens})  # warm: channel and hash cache
                out: dict[str, list[float]] = {"route": [], "keys": [], "score": []}
                for _ in range(repeat):
                    decision = await router.route({"prompt": tokens})
                    assert decision.decode.index == 2 and decision.decode.prefix_keys == len(keys)
                    out["route"].append(decision.seconds)
                    started = time.perf_counter()  # the two parts, timed apart
                    spec.chunk_keys(tokens, cache=router._cache)
                    out["keys"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await router.directory.score(keys)  # type: ignore[union-attr]
                    out["score"].append(time.perf_counter() - started)
                return out
            finally:
                await router.close()

        samples = {name: sorted(values) for name, values in asyncio.run(measure()).items()}
    return {
        "p50_ms": _pct(samples["route"], 50) * 1000,
        "p99_ms": _pct(samples["route"], 99) * 1000,
        "keys_p50_ms": _pct(samples["keys"], 50) * 1000,
        "score_call_p50_ms": _pct(samples["score"], 50) * 1000,
    }


def run_routing_bench(
    *, requests: int = 600, nodes: int = 4, cpu_bytes: int = 2 << 20, json_path: str | None = None
) -> dict[str, Any]:
    """The whole benchmark; prints the table and returns every number."""
    trace = make_trace(TraceConfig(requests=requests))
    log_dir = tempfile.mkdtemp(prefix="kvpeer-routing-")
    rows = []
    for policy in (RoutePolicy.ROUND_ROBIN, RoutePolicy.PREFIX):
        started = time.monotonic()
        row = run_policy(policy, trace, nodes=nodes, cpu_bytes=cpu_bytes, log_dir=log_dir).row()
        row["wall_s"] = time.monotonic() - started
        rows.append(row)
    long = {store: long_prompt_overhead(store) for store in ("memory", "redis")}
    shutil.rmtree(log_dir, ignore_errors=True)
    out = {
        "trace": {"requests": requests, "nodes": nodes, "cpu_bytes_per_node": cpu_bytes},
        "policies": rows,
        "long_prompt_4096_keys": long,
    }
    print_routing(out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


def print_routing(out: dict[str, Any]) -> None:
    rows = out["policies"]
    head = f"{'policy':<12} {'hit rate':>8} {'local':>6} {'peer':>6} {'pulled':>10} {'computed':>8} {'recomputed':>10} {'route p50':>9} {'route p99':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['policy']:<12} {r['hit_rate']:>8.1%} {r['local_hits']:>6} {r['peer_hits']:>6} "
            f"{r['bytes_pulled'] / 2**20:>7.1f} MiB {r['computed']:>8} {r['recomputed']:>10} "
            f"{r['route_p50_ms']:>6.2f} ms {r['route_p99_ms']:>6.2f} ms"
        )
    rr, px = rows[0], rows[1]
    ratio = rr["recomputed"] / max(1, px["recomputed"])
    print(
        f"prefix routing recomputes {ratio:.1f}x fewer chunks "
        f"({px['recomputed']} against {rr['recomputed']}) and pulls "
        f"{px['bytes_pulled'] / 2**20:.1f} MiB against {rr['bytes_pulled'] / 2**20:.1f} MiB"
    )
    for store, numbers in out["long_prompt_4096_keys"].items():
        if numbers:
            print(
                f"4,096-key prompt, {store} directory: route p50 {numbers['p50_ms']:.2f} ms, "
                f"p99 {numbers['p99_ms']:.2f} ms (p50 of its parts: keys "
                f"{numbers['keys_p50_ms']:.2f} ms, Directory.Score call "
                f"{numbers['score_call_p50_ms']:.2f} ms)"
            )
