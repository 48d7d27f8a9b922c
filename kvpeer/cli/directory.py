"""``kvpeer directory``: run the directory service until SIGTERM or SIGINT.

Imports nothing from torch or vLLM, so a directory host needs only kvpeer's
base dependencies. Once serving, prints one line to stdout::

    kvpeer directory ready on 0.0.0.0:7600 (store memory, lease 10.0 s, metrics :9100)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from kvpeer import DEFAULT_DIRECTORY_PORT
from kvpeer.api import cert_reload
from kvpeer.api.endpoint import parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.security import Security
from kvpeer.server.directory.authz import NamespaceAllowList
from kvpeer.server.directory.service import DirectoryServer, check_lease_ttl
from kvpeer.server.directory.store import MisconfiguredStoreError, StoreError
from kvpeer.server.directory.stores import open_store

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_DIRECTORY_PORT}",
        metavar="HOST:PORT",
        help="gRPC address to serve on (default %(default)s; port 0 picks a free port)",
    )
    parser.add_argument(
        "--store",
        default="memory",
        metavar="memory|redis://HOST:PORT/DB|redis+cluster://HOST:PORT,.../",
        help="where to keep the state: in this process (default) or in Redis or a Redis "
        "Cluster (?wait=N: acknowledge writes once N replicas have them; ?shards=N: split "
        "the directory N ways, default one shard per primary), shared by every directory "
        "replica using it and kept across restarts",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a node stays listed without a heartbeat (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus /metrics on this port (same host as --listen; 0: a free port)",
    )
    parser.add_argument("--tls-cert", metavar="F", help="PEM certificate: serve TLS")
    parser.add_argument("--tls-key", metavar="F", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-ca", metavar="F", help="PEM CA: require client certificates it signed (mutual TLS)"
    )
    parser.add_argument(
        "--auth-token-file",
        metavar="F",
        help="refuse calls without this bearer token (shared: its holders are trusted as any node)",
    )
    parser.add_argument(
        "--read-only-token-file",
        metavar="F",
        help="a bearer token for read-only callers (Locate, ListNodes, Stats; no writes)",
    )
    parser.add_argument(
        "--node-tokens",
        metavar="FILE",
        help="JSON {node id: token file}: each token may write only as its node id",
    )
    parser.add_argument(
        "--identity",
        choices=("san-uri", "san-dns", "cn"),
        help="with --tls-ca: the client certificate field that is the caller's node id "
        "(binds writes to it)",
    )
    parser.add_argument(
        "--identity-map",
        metavar="FILE",
        help='JSON {certificate identity: node id or {"role": "reader"|"admin"}}',
    )
    parser.add_argument(
        "--namespace-allow",
        metavar="FILE",
        help="JSON {fingerprint digest: [identities]}: serve those namespaces to them only",
    )


def _security(args: argparse.Namespace) -> Security:
    tls = {
        name: path
        for name, path in (("cert", args.tls_cert), ("key", args.tls_key), ("ca", args.tls_ca))
        if path is not None
    }
    if args.identity is not None:
        tls["identity"] = args.identity
    if args.identity_map is not None:
        tls["identity_map"] = args.identity_map
    if tls and ("cert" not in tls or "key" not in tls):
        raise ConfigError("--tls-cert", "give --tls-cert and --tls-key together to serve TLS")
    try:
        return Security.from_config(
            tls or None,
            args.auth_token_file,
            read_only_token_file=args.read_only_token_file,
            node_tokens=args.node_tokens,
        )
    except ConfigError as exc:  # name the flag, not the config key: tls.key -> --tls-key
        flag, _, where = exc.key.partition("[")
        flag = flag.replace("tls.identity", "identity").replace(".", "-").replace("_", "-")
        problem = f"[{where} {exc.problem}" if where else exc.problem
        raise ConfigError("--" + flag, problem) from exc


def _build(args: argparse.Namespace) -> DirectoryServer:
    check_lease_ttl(args.lease_ttl, key="--lease-ttl")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError("--metrics-port", f"{args.metrics_port} is not a port number")
    listen = parse_endpoint(args.listen, key="--listen", allow_port_zero=True)
    security = _security(args)
    namespace_allow = (
        None
        if args.namespace_allow is None
        else NamespaceAllowList.from_file(args.namespace_allow, "--namespace-allow")
    )
    store = open_store(args.store, key="--store")
    return DirectoryServer(
        listen,
        store=store,
        lease_ttl_s=args.lease_ttl,
        security=security,
        metrics_listen=None
        if args.metrics_port is None
        else str(listen.with_port(args.metrics_port)),
        listen_key="--listen",
        namespace_allow=namespace_allow,
    )


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    try:
        server = _build(args).start()
    except (ConfigError, StoreError) as exc:
        print(f"kvpeer directory: error: {exc}", file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Changed TLS files are picked up within a second anyway; SIGHUP makes it immediate.
    signal.signal(signal.SIGHUP, lambda *_: cert_reload.reload_now())
    try:
        server.store.stats()
    except MisconfiguredStoreError as exc:
        print(f"kvpeer directory: error: {exc}", file=sys.stderr)
        server.stop(grace=0)
        return 2
    except StoreError as exc:
        log.warning("%s: serving anyway; calls fail with UNAVAILABLE until it is back", exc)
    metrics = f", metrics :{server.metrics_port}" if server.metrics_port is not None else ""
    print(
        f"kvpeer directory ready on {server.endpoint} "
        f"(store {server.store.name}, lease {server.lease_ttl_s:.1f} s{metrics})",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping")
        server.stop(grace=2.0)
    return 0
