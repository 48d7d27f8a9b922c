"""Container health check: exit 0 when a gRPC server's ``grpc.health.v1.Health`` is SERVING.

    python3 grpc_health_check.py HOST:PORT [--tls-cert F --tls-key F] [--tls-ca F] [--timeout S]

docker-compose.yml runs it in the directory container. Under TLS, ``--tls-ca`` verifies
the server and ``--tls-cert``/``--tls-key`` are presented to a mutual-TLS server. The
health service needs no bearer token. Exit status 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpeer.api.errors import ConfigError
from kvpeer.api.security import Security


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", metavar="HOST:PORT")
    parser.add_argument("--tls-cert", metavar="F")
    parser.add_argument("--tls-key", metavar="F")
    parser.add_argument("--tls-ca", metavar="F")
    parser.add_argument("--service", default="", help="service name (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S")
    args = parser.parse_args(argv)
    tls = {
        name: path
        for name, path in (("cert", args.tls_cert), ("key", args.tls_key), ("ca", args.tls_ca))
        if path is not None
    }
    try:
        security = Security.from_config(tls or None)
    except ConfigError as exc:
        print(f"grpc_health_check: {exc}", file=sys.stderr)
        return 1
    with security.open_channel(args.target) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
        except grpc.RpcError as exc:
            print(
                f"grpc_health_check: {args.target}: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
            )
            return 1
    if status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(f"grpc_health_check: {args.target}: {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
