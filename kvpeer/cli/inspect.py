"""``kvpeer inspect``: show which nodes can share KV chunks, and why not.

- ``--node HOST:PORT``: asks the node's KVPeer service for its node id, chunk size
  and fingerprint (a Handshake without a fingerprint, which servers answer
  without comparing) and prints the ingredients.
- ``--node A --node B [...]``: the same for each, then whether they share a
  fingerprint and, if not, which ingredients differ and what to change.
- ``--directory HOST:PORT``: lists the directory's nodes grouped by fingerprint.

Exit status: 0 when everything answered (and all ``--node``\\ s share one
fingerprint), 1 when the nodes do not share, 2 on an error (unreachable
endpoint, refused call, bad flag), reported on one line.

It uses the generated stubs directly and never imports vLLM or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.endpoint import Endpoint, parse_endpoint
from kvpeer.api.errors import ConfigError, WireError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.security import Security
from kvpeer.cli import credentials
from kvpeer.v1 import directory_pb2, directory_pb2_grpc, peer_pb2, peer_pb2_grpc

EXIT_OK = 0
EXIT_NOT_SHARED = 1
EXIT_ERROR = 2
#: The node id inspect announces in its handshakes (servers log it).
INSPECT_NODE_ID = "kvpeer-inspect"

_R = TypeVar("_R")


class InspectError(Exception):
    """A one-line reason to give up (exit status 2)."""


@dataclass(frozen=True)
class NodeReport:
    """What a node said about itself in an inspect-only handshake."""

    endpoint: Endpoint
    node_id: str
    protocol_version: int
    chunk_bytes: int
    fingerprint: Fingerprint
    max_keys_per_lookup: int
    lease_ttl_ms: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a node's kvpeer endpoint; repeat to check whether nodes can share chunks",
    )
    parser.add_argument(
        "--directory", metavar="HOST:PORT", help="list the directory's nodes by fingerprint"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="deadline of each call (5)"
    )
    credentials.add_arguments(parser, "the nodes and the directory")


def run(args: argparse.Namespace) -> int:
    try:
        if not args.node and not args.directory:
            raise InspectError("give --node HOST:PORT (repeatable) and/or --directory HOST:PORT")
        if not args.timeout > 0:
            raise InspectError(f"--timeout must be positive, got {args.timeout}")
        node_endpoints = [parse_endpoint(text, key="--node") for text in args.node]
        directory = args.directory and parse_endpoint(args.directory, key="--directory")
        security = credentials.security(args)
        status = EXIT_OK
        if node_endpoints:
            nodes = [inspect_node(e, security, args.timeout) for e in node_endpoints]
            print(format_nodes(nodes))
            status = EXIT_OK if _all_shared(nodes) else EXIT_NOT_SHARED
        if directory:
            listed = list_directory(directory, security, args.timeout)
            if node_endpoints:
                print()
            print(format_directory(directory, listed))
        return status
    except ConfigError as exc:
        _fail(f"{credentials.FLAGS.get(exc.key, exc.key)}: {exc.problem}")
    except InspectError as exc:
        _fail(str(exc))
    return EXIT_ERROR


def inspect_node(endpoint: Endpoint, security: Security, timeout_s: float) -> NodeReport:
    """The node's own description, from a Handshake without a fingerprint."""
    request = peer_pb2.HandshakeRequest(protocol_version=PROTOCOL_VERSION, node_id=INSPECT_NODE_ID)
    response = _call(
        endpoint,
        security,
        lambda channel: peer_pb2_grpc.KVPeerStub(channel).Handshake(request, timeout=timeout_s),
        what="node",
    )
    if not response.HasField("fingerprint"):
        raise InspectError(f"node {endpoint} answered without a fingerprint")
    try:
        fingerprint = Fingerprint.from_proto(response.fingerprint)
    except WireError as exc:
        raise InspectError(f"node {endpoint} sent an invalid fingerprint: {exc}") from None
    return NodeReport(
        endpoint=endpoint,
        node_id=response.node_id,
        protocol_version=response.protocol_version,
        chunk_bytes=response.chunk_bytes,
        fingerprint=fingerprint,
        max_keys_per_lookup=response.max_keys_per_lookup,
        lease_ttl_ms=response.lease_ttl_ms,
    )


def list_directory(
    endpoint: Endpoint, security: Security, timeout_s: float
) -> list[directory_pb2.NodeInfo]:
    """Every live node the directory knows, in its order."""
    response = _call(
        endpoint,
        security,
        lambda channel: directory_pb2_grpc.DirectoryStub(channel).ListNodes(
            directory_pb2.ListNodesRequest(), timeout=timeout_s
        ),
        what="directory",
    )
    return list(response.nodes)


def format_nodes(nodes: Sequence[NodeReport]) -> str:
    """Each node and its fingerprint; then, for several, whether they share."""
    blocks = []
    for node in nodes:
        blocks.append(
            f"node {_name(node)} at {node.endpoint}\n"
            f"  protocol {node.protocol_version}, chunk {node.chunk_bytes} bytes, "
            f"max {node.max_keys_per_lookup} keys per lookup, lease {node.lease_ttl_ms} ms\n"
            + _indent(node.fingerprint.describe())
        )
    if len(nodes) > 1:
        blocks.append(_sharing(nodes))
    return "\n\n".join(blocks)


def format_directory(endpoint: Endpoint, nodes: Sequence[directory_pb2.NodeInfo]) -> str:
    """The directory's nodes grouped by fingerprint digest, each group's ingredients once."""
    groups: dict[str, list[directory_pb2.NodeInfo]] = {}
    for node in nodes:
        groups.setdefault(node.fingerprint.digest, []).append(node)
    lines = [
        f"directory {endpoint}: {len(nodes)} node{'s' * (len(nodes) != 1)}, "
        f"{len(groups)} fingerprint{'s' * (len(groups) != 1)}"
    ]
    for digest, members in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append("")
        try:
            lines.append(Fingerprint.from_proto(members[0].fingerprint).describe())
        except WireError as exc:
            lines.append(f"fingerprint {digest or '<none>'} (invalid: {exc})")
        lines.append(f"  nodes ({len(members)}):")
        width = max(len(m.node_id) for m in members)
        lines.extend(
            f"    {m.node_id.ljust(width)}  {m.endpoint}  epoch {m.epoch}  {m.keys} keys  "
            f"lease {m.lease_remaining_ms} ms"
            for m in members
        )
    return "\n".join(lines)


def _sharing(nodes: Sequence[NodeReport]) -> str:
    first = nodes[0]
    if _all_shared(nodes):
        return f"all {len(nodes)} nodes share fingerprint {first.fingerprint.digest}"
    lines = []
    for other in nodes[1:]:
        reason = first.fingerprint.mismatch(other.fingerprint)
        if reason is None:
            lines.append(f"{_label(other)} shares with {_label(first)}")
        else:
            lines.append(
                f"{_label(other)} does NOT share with {_label(first)} "
                f"[ours = {_name(first)}, theirs = {_name(other)}]:\n"
                + "\n".join(f"  - {part}" for part in reason.split("; "))
            )
    return "\n".join(lines)


def _all_shared(nodes: Sequence[NodeReport]) -> bool:
    return len({node.fingerprint.digest for node in nodes}) == 1


def _name(node: NodeReport) -> str:
    return node.node_id or "<unnamed>"


def _label(node: NodeReport) -> str:
    return f"{_name(node)} ({node.endpoint})"


def _call(
    endpoint: Endpoint,
    security: Security,
    call: Callable[[grpc.Channel], _R],
    *,
    what: str,
) -> _R:
    """Run one call on a fresh channel; turn any RPC failure into an InspectError."""
    channel = security.open_channel(str(endpoint))
    try:
        return call(channel)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())
        name = code.name if code is not None else "ERROR"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise InspectError(f"cannot reach {what} {endpoint}: {name}: {details}") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise InspectError(
                f"{endpoint} does not serve the kvpeer {what} service ({name}): "
                f"is it a kvpeer {what}?"
            ) from None
        raise InspectError(f"{what} {endpoint} refused the call: {name}: {details}") from None
    finally:
        channel.close()


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _fail(message: str) -> None:
    print(f"kvpeer inspect: error: {message}", file=sys.stderr)
