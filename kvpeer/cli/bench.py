"""``kvpeer bench``: kvpeer against raw TCP and vLLM's own p2p tier, in one run.

The same chunk set (``--chunks`` rows of ``--chunk-mib``) moves from one process
to another by each *setting*:

===============  ===============================================================
``raw``         a raw TCP socket into a buffer with ``recv_into``: the ceiling
``kvpeer``      kvpeer's prefix reuse: the consumer node finds the chunks at its
                peer (RETRY, Lookup, HIT) and pulls them into its primary tier
                over loopback TCP (``same_host: off``)
``kvpeer-pd``   kvpeer's PD handoff, with the parameters of vLLM's p2p recipe (TCP)
``same-host``   prefix reuse with the same-host fast path: the consumer copies the
                rows from the holder's /dev/shm file (``same_host: auto``)
``same-host-pd`` the PD handoff with the same-host fast path
``memcpy``      ``np.copyto`` between two /dev/shm mappings in one process: the
                ceiling of a same-host copy
``p2p``         vLLM 0.33.0's p2p tier (ZMQ + NIXL/UCX), UCX defaults
``p2p-tcp``     the same with ``UCX_TLS=tcp`` (comparable to a TCP network)
``p2p-tcp-lo``  the same with ``UCX_TLS=tcp UCX_NET_DEVICES=lo``
===============  ===============================================================

Nodes are simulated vLLM nodes (:mod:`kvpeer.sim`): vLLM's real manager and
shared-memory primary tier, one OS process each. Every loaded row is checked
against what its holder computed. A transfer is timed from the consumer's first
lookup until every chunk is in its primary tier. Repetitions are interleaved
(each repetition runs every setting, in a rotating order), and while one
setting runs, the processes of the others are stopped (SIGSTOP) so that they
take no CPU — vLLM's UCX progress threads spin even when idle.

Two networks: loopback, and (``--veth-gbit``, root only) two network
namespaces joined by a veth pair rate-limited with ``tc``, where the table also
shows the share of the link rate.

Then, unless switched off: directory Publish/Locate throughput
(:mod:`kvpeer.bench.directory`), the tier's cost on vLLM's calling thread per
call (``lookup``, ``submit_load``, ``serve_external_requests``; timed inside
the kvpeer node processes over the loopback run), and each node's idle CPU use
from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvpeer.api.errors import KVPeerError
from kvpeer.bench.scoreboard import (
    DEFAULT_SETTINGS,
    P2P_ENVS,
    SETTINGS,
    BenchError,
    directory_throughput,
    print_table,
    run_network,
)
from kvpeer.sim.node import NodeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--routing",
        action="store_true",
        help="instead: round-robin against prefix routing on a shared-prefix trace "
        "(kvpeer.bench.routing; about 2 minutes)",
    )
    parser.add_argument(
        "--routing-requests", type=int, default=600, help="requests in the --routing trace"
    )
    parser.add_argument("--chunks", type=int, default=256, help="chunks moved per transfer")
    parser.add_argument(
        "--chunk-mib", type=float, default=2.0, help="chunk size (2 MiB: 16 tokens of Llama-3-8B)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SETTINGS),
        help=f"comma-separated settings out of {','.join(SETTINGS)}",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every number here")
    parser.add_argument(
        "--veth-gbit", type=float, default=10.0, help="rate limit of the veth link (Gbit/s)"
    )
    parser.add_argument("--no-veth", action="store_true", help="loopback only")
    parser.add_argument("--no-loopback", action="store_true", help="the veth link only")
    parser.add_argument("--no-directory", action="store_true", help="skip the directory throughput")
    parser.add_argument(
        "--directory-seconds", type=float, default=0.5, help="seconds per directory cell"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="window of the idle CPU measurement (0 skips it)",
    )
    parser.add_argument(
        "--log-dir",
        help="keep the node processes' logs here (default: a temporary directory, "
        "removed unless the run fails)",
    )


def run(args: argparse.Namespace) -> int:
    if args.routing:
        from kvpeer.bench.routing import run_routing_bench

        run_routing_bench(requests=args.routing_requests, json_path=args.json)
        return 0
    try:
        settings, chunk_bytes = _check_args(args)
    except BenchError as exc:
        print(f"kvpeer bench: {exc}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupt)  # clean up on kill as on Ctrl-C
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="kvpeer-bench-")
    os.makedirs(log_dir, exist_ok=True)
    report: dict[str, Any] = {
        "chunks": args.chunks,
        "chunk_bytes": chunk_bytes,
        "repeat": args.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "networks": {},
    }
    total = args.chunks * chunk_bytes
    print(
        f"kvpeer bench: {args.chunks} chunks of {chunk_bytes:,} bytes "
        f"({total / 2**20:,.0f} MiB) per transfer, {args.repeat} interleaved repetitions; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
        "(numbers from a shared machine are noisy: medians)"
    )
    try:
        _require_nixl(settings)
        networks = []
        if not args.no_loopback:
            networks.append(("loopback", None))
        if not args.no_veth:
            networks.append(("veth", args.veth_gbit))
        for name, rate in networks:
            result = run_network(name, rate, settings, args, chunk_bytes, log_dir, report)
            if result is not None:
                report["networks"][name] = result.to_dict()
                print_table(result)
        if not args.no_directory:
            report["directory"] = directory_throughput(args.directory_seconds)
    except (BenchError, KVPeerError, NodeError) as exc:
        print(f"kvpeer bench: {exc} (node logs in {log_dir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvpeer bench: interrupted; everything it started was stopped", file=sys.stderr)
        if args.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)  # kept above, when something failed
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _check_args(args: argparse.Namespace) -> tuple[list[str], int]:
    from kvpeer.bench.tier import sim_geometry

    settings = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise BenchError(f"--only: unknown setting(s) {unknown}; choose from {','.join(SETTINGS)}")
    if args.chunks < 1 or args.repeat < 1:
        raise BenchError("--chunks and --repeat must be at least 1")
    if args.no_loopback and args.no_veth:
        raise BenchError("--no-loopback and --no-veth leave no network to measure")
    chunk_bytes = round(args.chunk_mib * 2**20)
    try:
        sim_geometry(chunk_bytes)
    except ValueError as exc:
        raise BenchError(f"--chunk-mib: {exc}") from exc
    if args.veth_gbit <= 0:
        raise BenchError("--veth-gbit must be positive")
    return settings, chunk_bytes


def _require_nixl(settings: Sequence[str]) -> None:
    if not any(s in P2P_ENVS for s in settings):
        return
    try:
        import nixl  # noqa: F401
    except ImportError as exc:
        raise BenchError(
            "vLLM's p2p tier needs NIXL, which is not installed: pip install -e '.[bench]' "
            "(or leave the p2p settings out of --only)"
        ) from exc
