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
from kvpeer.cli import credentials
from kvpeer.cli import keys as keys_cli
from kvpeer.proxy.config import ProxyConfig
from kvpeer.proxy.routing import RoutePolicy
from kvpeer.proxy.server import ProxyServer

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
        "the decode nodes find the producer through the directory. NODE_ID=HOST:PORT also "
        "names its directory node id (when it is not the endpoint), for --route prefix",
    )
    parser.add_argument(
        "--decode-kvpeer",
        nargs="+",
        default=[],
        metavar="[NODE_ID=]HOST:PORT",
        help="each decode node's kvpeer endpoint (or directory node id and endpoint), in the "
        "order of --decode: how --route prefix knows which directory node each URL is",
    )
    routing = parser.add_argument_group("routing (see kvpeer.proxy.routing)")
    routing.add_argument(
        "--route",
        default=None,
        choices=[p.value for p in RoutePolicy],
        help="how nodes are picked (default: prefix when --directory is given, else "
        "round-robin). prefix: by the longest prefix of the request's chunk keys each node "
        "holds (token-id prompts only; text prompts, a slow or unreachable directory: "
        "round-robin), near-ties by load",
    )
    routing.add_argument(
        "--directory",
        nargs="+",
        metavar="HOST:PORT",
        help="the kvpeer directory (for --route prefix); several: replicas on one Redis",
    )
    routing.add_argument(
        "--route-timeout",
        type=float,
        default=ProxyConfig.route_timeout_s,
        metavar="S",
        help="deadline of the directory call that routes a request (default %(default)s)",
    )
    keys_cli.add_key_arguments(routing, "the nodes'", required=False)
    credentials.add_arguments(routing, "the directory")
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
    try:
        directory_security = credentials.security(args)
    except ConfigError as exc:
        raise ConfigError(credentials.FLAGS.get(exc.key, exc.key), exc.problem) from None
    key_spec = keys_cli.key_spec(args) if args.block_size is not None else None
    config = ProxyConfig.create(
        args.prefill,
        args.decode,
        args.prefill_kvpeer,
        args.decode_kvpeer,
        route=args.route,
        directory=args.directory,
        key_spec=key_spec,
        route_timeout_s=args.route_timeout,
        directory_security=directory_security,
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
