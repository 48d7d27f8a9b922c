"""``kvpeer proxy``: the prefill/decode OpenAI-compatible proxy (see :mod:`kvpeer.proxy.server`).

Runs without torch or vLLM. Serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.proxy.server import ProxyConfig, ProxyServer

DEFAULT_LISTEN = "0.0.0.0:8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where the proxy serves HTTP (default {DEFAULT_LISTEN}; port 0 picks a free port)",
    )
    parser.add_argument(
        "--prefill",
        nargs="+",
        required=True,
        metavar="URL",
        help="prefill nodes' vLLM base URLs, e.g. http://prefill:8000 (round-robin)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        required=True,
        metavar="URL",
        help="decode nodes' vLLM base URLs, e.g. http://decode:8000 (round-robin)",
    )
    parser.add_argument(
        "--prefill-kvpeer",
        nargs="+",
        default=[],
        metavar="HOST:PORT",
        help="each prefill node's kvpeer endpoint, in the order of --prefill; without it "
        "the decode nodes find the producer through the directory",
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="send the decode request without waiting for the prefill answer",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=ProxyConfig.timeout_s,
        metavar="S",
        help="longest wait for a node: a whole prefill request, a decode answer's headers "
        "and each gap between streamed chunks (default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=ProxyConfig.connect_timeout_s,
        metavar="S",
        help="longest wait to connect to a node (default %(default)s)",
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=ProxyConfig.health_timeout_s,
        metavar="S",
        help="longest wait for a node's /health or /v1/models (default %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> tuple[ProxyConfig, Endpoint]:
    """The validated config and listen address; raises ConfigError naming the option."""
    listen = parse_endpoint(args.listen, key="--listen", allow_port_zero=True)
    config = ProxyConfig.create(
        args.prefill,
        args.decode,
        args.prefill_kvpeer,
        concurrent=args.concurrent,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        health_timeout_s=args.health_timeout,
    )
    return config, listen


def run(args: argparse.Namespace) -> int:
    try:
        config, listen = config_from_args(args)
        asyncio.run(_serve(config, listen))
    except ConfigError as exc:
        print(f"kvpeer proxy: error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(config: ProxyConfig, listen: Endpoint) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await ProxyServer(config, listen).start()
    try:
        await stop.wait()
    finally:
        await server.close()
