"""The scoreboard behind ``kvpeer bench``: each setting's runner, interleaved timing, tables.

:mod:`kvpeer.cli.bench` parses the command line and calls :func:`run_network` once
per network (loopback, then the veth link); this module starts every setting's
node pair or sender (:class:`_Runner`), times interleaved repetitions with the
other settings' processes stopped, checks every loaded row, and prints the table
(:func:`print_table`). The setting names and what they measure are in
:data:`SETTINGS` and in :mod:`kvpeer.cli.bench`'s docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvpeer.bench.process import cpu_seconds

if TYPE_CHECKING:
    from kvpeer.bench.tier import Launcher

#: setting -> what it is (the table's legend).
SETTINGS: dict[str, str] = {
    "raw": "raw TCP socket, recv_into a buffer (the ceiling)",
    "kvpeer": "kvpeer prefix reuse over loopback TCP (same_host off): Lookup, pull into the primary",
    "kvpeer-pd": "kvpeer PD handoff over TCP (same_host off; remote_decoder / remote_prefiller)",
    "same-host": "kvpeer prefix reuse, same-host fast path (copy from the holder's /dev/shm file)",
    "same-host-pd": "kvpeer PD handoff, same-host fast path",
    "memcpy": "numpy copy between two /dev/shm mappings in one process (the same-host ceiling)",
    "p2p": "vLLM p2p tier (ZMQ + NIXL/UCX), UCX defaults",
    "p2p-tcp": "vLLM p2p tier, UCX_TLS=tcp",
    "p2p-tcp-lo": "vLLM p2p tier, UCX_TLS=tcp UCX_NET_DEVICES=lo",
}
DEFAULT_SETTINGS = (
    "raw",
    "kvpeer",
    "kvpeer-pd",
    "same-host",
    "same-host-pd",
    "memcpy",
    "p2p",
    "p2p-tcp",
)
#: Settings that run kvpeer's pair with the same-host fast path (the others turn it off).
SAME_HOST_SETTINGS = ("same-host", "same-host-pd")
#: UCX environment of each p2p setting.
P2P_ENVS: dict[str, dict[str, str]] = {
    "p2p": {},
    "p2p-tcp": {"UCX_TLS": "tcp"},
    "p2p-tcp-lo": {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"},
}
#: Settings that cannot use the veth link, and why.
NOT_ON_VETH = {
    "p2p": "UCX defaults reach the other namespace through shared memory, not the link",
    "p2p-tcp-lo": "the link is not the loopback device",
    "same-host": "the fast path is for two nodes on one host, not across a link",
    "same-host-pd": "the fast path is for two nodes on one host, not across a link",
    "memcpy": "a copy inside one process uses no link",
}
RAW_SEED = 7
#: Chunks of the unmeasured transfer that opens a path before each measured one.
WARMUP_CHUNKS = 2


class BenchError(Exception):
    """A setting could not run or delivered wrong bytes; the message says which."""


@dataclass
class NetworkResult:
    """Samples of every setting on one network."""

    name: str
    description: str
    settings: list[str]
    samples_gbps: dict[str, list[float]] = field(default_factory=dict)
    link_gbps: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def median(self, setting: str) -> float:
        return statistics.median(self.samples_gbps[setting])

    def ratio(self, setting: str, baseline: str) -> float | None:
        """Ratio of the medians (None when the baseline did not run)."""
        if baseline not in self.samples_gbps or setting not in self.samples_gbps:
            return None
        return self.median(setting) / self.median(baseline)

    def paired_ratio(self, setting: str, baseline: str) -> float | None:
        """Median of each repetition's ratio: steadier when the machine's load drifts."""
        if baseline not in self.samples_gbps or setting not in self.samples_gbps:
            return None
        pairs = zip(self.samples_gbps[setting], self.samples_gbps[baseline], strict=True)
        return statistics.median(value / base for value, base in pairs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "description": self.description,
            "skipped": self.skipped,
            "settings": {},
        }
        if self.link_gbps is not None:
            out["link_gbps"] = self.link_gbps
        for setting, samples in self.samples_gbps.items():
            entry = {
                "samples_gbps": samples,
                "median_gbps": self.median(setting),
                "ratio_to_raw": self.ratio(setting, "raw"),
                "ratio_to_p2p_tcp": self.ratio(setting, "p2p-tcp"),
                "paired_ratio_to_raw": self.paired_ratio(setting, "raw"),
                "paired_ratio_to_p2p_tcp": self.paired_ratio(setting, "p2p-tcp"),
                "ratio_to_p2p": self.ratio(setting, "p2p"),
                "ratio_to_memcpy": self.ratio(setting, "memcpy"),
                "paired_ratio_to_p2p": self.paired_ratio(setting, "p2p"),
                "paired_ratio_to_memcpy": self.paired_ratio(setting, "memcpy"),
            }
            if self.link_gbps:
                entry["share_of_link"] = self.median(setting) / self.link_gbps
            out["settings"][setting] = entry
        return out


# ---------------------------------------------------------------------------
# One network
# ---------------------------------------------------------------------------


def run_network(
    name: str,
    rate_gbit: float | None,
    settings: list[str],
    args: argparse.Namespace,
    chunk_bytes: int,
    log_dir: str,
    report: dict[str, Any],
) -> NetworkResult | None:
    from kvpeer.bench import netns
    from kvpeer.bench.tier import close_concurrently

    with contextlib.ExitStack() as stack:
        if rate_gbit is None:
            hosts = ("127.0.0.1", "127.0.0.1")
            p2p_envs = P2P_ENVS
            launch = None
            result = NetworkResult(name, "loopback, two processes on this machine", settings)
        else:
            reason = netns.unavailable_reason()
            if reason is not None:
                print(f"\nveth setting skipped: {reason}")
                report["networks"][name] = {"skipped": reason}
                return None
            link = stack.enter_context(netns.VethLink(rate_gbit))
            hosts = (link.addresses["a"], link.addresses["b"])
            launch = link.run_in
            # UCX would otherwise also try the loopback device, which ends in each namespace.
            p2p_envs = {k: {**env, "UCX_NET_DEVICES": netns.DEVICE} for k, env in P2P_ENVS.items()}
            on_link = [s for s in settings if s not in NOT_ON_VETH]
            result = NetworkResult(name, link.describe(), on_link)
            result.link_gbps = link.link_bytes_per_s / 1e9
            result.skipped = {s: NOT_ON_VETH[s] for s in settings if s in NOT_ON_VETH}
        print(f"\n== {name}: {result.description}")
        for setting, why in result.skipped.items():
            print(f"   {setting} left out: {why}")
        if not result.settings:
            return None
        closers: list[Callable[[], None]] = []
        stack.callback(close_concurrently, closers)
        runners = _start_runners(
            result.settings, args.chunks, chunk_bytes, hosts, launch, p2p_envs, log_dir, closers
        )
        _measure(result, runners, args.repeat, args.chunks)
        if name == "loopback":
            _extras(runners, args.idle_seconds, report)
        return result


@dataclass
class _Runner:
    """One setting: how to time a transfer, and the node pair to pause around it (if any)."""

    #: Moves that many chunks of the set, verified; returns GB/s.
    transfer: Callable[[int], float]
    pair: Any = None

    def resume(self) -> None:
        if self.pair is not None:
            self.pair.resume()

    def pause(self) -> None:
        if self.pair is not None:
            self.pair.pause()


def _start_runners(
    settings: Sequence[str],
    num_chunks: int,
    chunk_bytes: int,
    hosts: tuple[str, str],
    launch: Launcher | None,
    p2p_envs: dict[str, dict[str, str]],
    log_dir: str,
    closers: list[Callable[[], None]],
) -> dict[str, _Runner]:
    """Start every setting's processes at once (vLLM's import takes seconds), then pause them.

    Appends to ``closers`` what stops each process, also when start-up fails.
    """
    from kvpeer.bench.p2p import P2PPair
    from kvpeer.bench.tier import KvpeerPair

    runners: dict[str, _Runner] = {}
    pairs: list[Any] = []
    for prefix, pd, same_host in (
        ("kvpeer", "kvpeer-pd", "off"),
        ("same-host", "same-host-pd", "auto"),
    ):
        if prefix not in settings and pd not in settings:
            continue
        os.makedirs(os.path.join(log_dir, prefix), exist_ok=True)
        kvpeer = KvpeerPair(
            num_chunks,
            chunk_bytes,
            hosts=hosts,
            launch=launch,
            log_dir=os.path.join(log_dir, prefix),
            tier={"same_host": same_host},
        )
        closers.append(kvpeer.close)
        pairs.append(kvpeer.launch())
        if prefix in settings:
            runners[prefix] = _Runner(_kvpeer_prefix_transfer(kvpeer), kvpeer)
        if pd in settings:
            runners[pd] = _Runner(_kvpeer_handoff_transfer(kvpeer), kvpeer)
    if "memcpy" in settings:
        runners["memcpy"] = _memcpy_runner(num_chunks, chunk_bytes, closers)
    for setting in settings:
        if setting in P2P_ENVS:
            pair = P2PPair(
                num_chunks,
                chunk_bytes,
                name=setting,
                env=p2p_envs[setting],
                hosts=hosts,
                launch=launch,
                log_dir=log_dir,
            )
            closers.append(pair.close)
            pairs.append(pair.launch())
            runners[setting] = _Runner(_p2p_transfer(setting, pair), pair)
    if "raw" in settings:
        runners["raw"] = _raw_runner(num_chunks, chunk_bytes, hosts, launch, closers)
    started = time.monotonic()
    for pair in pairs:
        pair.wait_ready()
        if isinstance(pair, KvpeerPair):
            for node in pair.nodes:
                node.call("time_tier_calls")
        pair.pause()
    print(f"   {len(pairs) * 2} node processes ready in {time.monotonic() - started:.0f}s")
    return {s: runners[s] for s in settings}


def _fresh_keys(label: str, chunks: int) -> list[str]:
    from kvpeer.sim.rows import chunk_keys

    return [k.hex() for k in chunk_keys(f"kvpeer-bench/{label}", chunks)]


def _kvpeer_prefix_transfer(pair: Any) -> Callable[[int], float]:
    counter = iter(range(1 << 62))

    def transfer(chunks: int) -> float:
        keys = _fresh_keys(f"kvpeer-{next(counter)}", chunks)
        pair.store(keys)
        return pair.pull_prefix(keys).gbps

    return transfer


def _kvpeer_handoff_transfer(pair: Any) -> Callable[[int], float]:
    counter = iter(range(1 << 62))

    def transfer(chunks: int) -> float:
        label = f"kvpeer-pd-{next(counter)}"
        return pair.pull_handoff(_fresh_keys(label, chunks), label).gbps

    return transfer


def _p2p_transfer(setting: str, pair: Any) -> Callable[[int], float]:
    counter = iter(range(1 << 62))

    def transfer(chunks: int) -> float:
        label = f"{setting}-{next(counter)}"
        return pair.handoff(_fresh_keys(label, chunks), label).gbps

    return transfer


def _raw_runner(
    num_chunks: int,
    chunk_bytes: int,
    hosts: tuple[str, str],
    launch: Launcher | None,
    closers: list[Callable[[], None]],
) -> _Runner:
    import numpy as np

    from kvpeer.bench.rawtcp import RawTcpSender, receive
    from kvpeer.bench.rows import synthetic_rows
    from kvpeer.bench.tier import run_here

    launch = launch or run_here
    sender = launch("a", lambda: RawTcpSender(num_chunks, chunk_bytes, RAW_SEED, host=hosts[0]))
    closers.append(sender.stop)
    expected = synthetic_rows(num_chunks, chunk_bytes, RAW_SEED)
    dest = np.empty_like(expected)

    def transfer(chunks: int) -> float:
        part = dest[:chunks]
        part.fill(0)
        try:
            seconds = launch(
                "b", lambda: receive(sender.port, memoryview(part), host=hosts[0], timeout_s=600)
            )
        except OSError as exc:
            raise BenchError(f"raw TCP transfer failed: {exc}") from exc
        if not np.array_equal(part, expected[:chunks]):
            raise BenchError("raw TCP delivered wrong bytes")
        return part.nbytes / seconds / 1e9

    return _Runner(transfer)


def _memcpy_runner(num_chunks: int, chunk_bytes: int, closers: list[Callable[[], None]]) -> _Runner:
    """The ceiling of a same-host copy: ``np.copyto`` between two /dev/shm mappings."""
    import mmap

    import numpy as np

    from kvpeer.bench.rows import synthetic_rows

    size = num_chunks * chunk_bytes
    maps = []
    for side in ("src", "dst"):
        path = f"/dev/shm/kvpeer-bench-memcpy-{side}-{os.getpid()}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            maps.append(mmap.mmap(fd, size))
        finally:
            os.close(fd)
            os.unlink(path)
    src = np.frombuffer(maps[0], dtype=np.uint8).reshape(num_chunks, chunk_bytes)
    dst = np.frombuffer(maps[1], dtype=np.uint8).reshape(num_chunks, chunk_bytes)
    src[:] = synthetic_rows(num_chunks, chunk_bytes, RAW_SEED)
    dst.fill(1)  # fault the pages in, as vLLM pre-faults its primary tier

    def close() -> None:
        nonlocal src, dst
        del src, dst
        for region in maps:
            with contextlib.suppress(BufferError):
                region.close()

    closers.append(close)

    def transfer(chunks: int) -> float:
        started = time.perf_counter()
        np.copyto(dst[:chunks], src[:chunks])
        seconds = time.perf_counter() - started
        if not np.array_equal(dst[:chunks], src[:chunks]):
            raise BenchError("memcpy delivered wrong bytes")
        return chunks * chunk_bytes / seconds / 1e9

    return _Runner(transfer)


def _measure(
    result: NetworkResult, runners: dict[str, _Runner], repeat: int, num_chunks: int
) -> None:
    """``repeat`` rounds of every setting, in an order that rotates each round.

    A setting's processes run only for its turn. Each turn starts with an
    unmeasured :data:`WARMUP_CHUNKS` transfer, which reopens what the pause may
    have closed (vLLM's p2p sessions time out after 10 s without heartbeats).
    """
    order = list(result.settings)
    for setting in order:
        result.samples_gbps[setting] = []
    for repetition in range(repeat):
        shift = repetition % len(order)
        for setting in order[shift:] + order[:shift]:
            runner = runners[setting]
            runner.resume()
            try:
                runner.transfer(WARMUP_CHUNKS)
                result.samples_gbps[setting].append(runner.transfer(num_chunks))
            finally:
                runner.pause()
        print(
            f"   repetition {repetition + 1}: "
            + ", ".join(f"{s} {result.samples_gbps[s][-1]:.2f}" for s in order)
            + " GB/s"
        )


# ---------------------------------------------------------------------------
# Extras: caller-thread cost, idle CPU, directory throughput
# ---------------------------------------------------------------------------


def _extras(runners: dict[str, _Runner], idle_seconds: float, report: dict[str, Any]) -> None:
    for prefix, key in (("kvpeer", "caller_cost_us"), ("same-host", "caller_cost_us_same_host")):
        _caller_costs(runners, prefix, key, report)
    if idle_seconds > 0:
        report["idle_cpu_percent"] = _idle_cpu(runners, idle_seconds)


def _caller_costs(
    runners: dict[str, _Runner], prefix: str, key: str, report: dict[str, Any]
) -> None:
    """The tier's cost on vLLM's calling thread in the pair of settings ``prefix*``."""
    kvpeer = next((r.pair for s, r in runners.items() if s.startswith(prefix)), None)
    if kvpeer is not None:
        kvpeer.resume()
        try:
            costs = {
                "consumer": kvpeer.consumer.call("tier_call_times"),
                "holder": kvpeer.holder.call("tier_call_times"),
            }
        finally:
            kvpeer.pause()
        report[key] = costs
        print(f"\n[{prefix} pair]", end="")
        _print_caller_costs(costs)


def _print_caller_costs(costs: dict[str, dict[str, dict[str, float]]]) -> None:
    print(
        "\nkvpeer tier, cost on vLLM's calling thread per call "
        "(timed in the node processes over the loopback repetitions):"
    )
    print(f"   {'call':<34} {'calls':>8} {'median us':>10} {'p99 us':>9} {'max us':>9}")
    for node, method in (
        ("consumer", "lookup"),
        ("consumer", "submit_load"),
        ("holder", "serve_external_requests"),
    ):
        cost = costs[node].get(method)
        if cost:
            print(
                f"   {method + ' (' + node + ')':<34} {cost['calls']:>8.0f} "
                f"{cost['median_us']:>10.1f} {cost['p99_us']:>9.1f} {cost['max_us']:>9.1f}"
            )


def _idle_cpu(runners: dict[str, _Runner], seconds: float) -> dict[str, dict[str, float]]:
    """Each node's CPU use over ``seconds`` while idle, one pair at a time (others stopped)."""
    print(f"\nidle CPU per node over {seconds:g} s (one pair at a time, the others stopped):")
    out: dict[str, dict[str, float]] = {}
    seen: set[int] = set()
    for setting, runner in runners.items():
        pair = runner.pair
        if pair is None or id(pair) in seen:
            continue
        seen.add(id(pair))
        name = "kvpeer" if setting.startswith("kvpeer") else setting
        name = "same-host" if setting.startswith("same-host") else name
        kvpeer_pair = name in ("kvpeer", "same-host")
        roles = ("holder", "consumer") if kvpeer_pair else ("producer", "consumer")
        pair.resume()
        try:
            time.sleep(1.0)  # let the resumed processes settle
            before = [cpu_seconds(pid) for pid in pair.pids]
            started = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            after = [cpu_seconds(pid) for pid in pair.pids]
        finally:
            pair.pause()
        out[name] = {
            role: (b - a) / elapsed * 100 for role, a, b in zip(roles, before, after, strict=True)
        }
        print(
            f"   {name:<12} "
            + ", ".join(f"{role} {value:5.1f}% of a core" for role, value in out[name].items())
        )
    return out


def directory_throughput(seconds: float) -> dict[str, Any]:
    from kvpeer.bench.directory import DirectoryProcess, measure_store

    print(f"\ndirectory (memory store, one caller, ~{seconds:g} s per cell):")
    with DirectoryProcess(["--store", "memory", "--lease-ttl", "600"]) as directory:
        result = measure_store(directory, "memory", seconds_per_cell=seconds)
    batches = sorted({cell.batch for cell in result.cells})
    print(f"   {'batch':>6} {'Publish keys/s':>15} {'Locate keys/s':>15}")
    for batch in batches:
        print(
            f"   {batch:>6} {result.cell('publish', batch).keys_per_s:>15,.0f} "
            f"{result.cell('locate', batch).keys_per_s:>15,.0f}"
        )
    print(
        f"   1,000-key Locate: {result.locate_server_ms:.3f} ms server time, "
        f"{result.locate_client_median_ms:.3f} ms round trip; "
        f"unary call floor {result.unary_floor_ms:.3f} ms"
    )
    return result.to_dict()


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def print_table(result: NetworkResult) -> None:
    """Medians, ratios of medians and, in brackets, the paired ratios (see paired_ratio)."""
    link = result.link_gbps
    print(f"\n{result.name}: {result.description}")
    header = (
        f"   {'setting':<12} {'median GB/s':>11} {'vs raw TCP':>15} {'vs p2p-tcp':>15}"
        f" {'vs p2p':>15} {'vs memcpy':>15}"
    )
    if link:
        header += f" {'of link':>8}"
    print(header + "  samples (GB/s)")
    for setting in result.settings:
        median = result.median(setting)
        line = f"   {setting:<12} {median:>11.2f}"
        for baseline in ("raw", "p2p-tcp", "p2p", "memcpy"):
            ratio = _ratio(result.ratio(setting, baseline))
            paired = _ratio(result.paired_ratio(setting, baseline))
            line += f" {ratio + ' (' + paired + ')' if paired != '-' else ratio:>15}"
        if link:
            line += f" {median / link:>8.0%}"
        samples = " ".join(f"{v:.2f}" for v in result.samples_gbps[setting])
        print(f"{line}  {samples}")
    print("   (ratios of the medians; in brackets the median of the per-repetition ratios)")
    for setting in result.settings:
        print(f"   {setting}: {SETTINGS[setting]}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
