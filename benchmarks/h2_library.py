"""kvpeer's hand-written HTTP/2 pull client against one built on the ``h2`` library.

    python benchmarks/h2_library.py --chunks 128 --chunk-mib 2 --repeat 5 [--json FILE]

Why: issue 14 asks whether the hand-written HTTP/2 framing
(:mod:`kvpeer.transport.frames`, :mod:`kvpeer.transport.connection`) could be
the python-hyper ``h2`` library instead, "only if it does not cost measurable
speed". Both clients pull the same rows from the same peer server process
(:class:`kvpeer.bench.pull.PeerNodeProcess`, from its fast Pull port) and do
the same work per pull: lookup (pin) + one Pull call on one stream + release,
each row's ``Chunk`` header decoded with :mod:`kvpeer.api.wire`, its data put in
its row of a preallocated buffer and its XXH3-128 digest checked there:

- ``kvpeer``: :meth:`PeerClient.pull <kvpeer.client.peer.PeerClient.pull>` with
  ``pull_transport="h2"``, 1 stream (``recv_into`` straight into the row);
- ``h2lib``: :class:`H2LibPull`, an ``h2.connection.H2Connection`` fed from
  ``recv_into`` a receive buffer, copying each ``DataReceived`` into the row and
  acknowledging it for flow control; the same SETTINGS as kvpeer's client
  (64 MiB windows, frames up to ``--h2-max-frame``) on one kept connection.

Repetitions are interleaved, medians printed with client CPU seconds per GB
(this process, all threads) and server CPU seconds per GB. Then, for the
server side, a micro-measurement of sending 2 MiB rows over a socketpair: h2's
``send_data`` + ``data_to_send`` + ``sendall`` (h2 hands back ``bytes``, so
every row is copied in user space at least once) against one ``sendmsg`` of a
memoryview over the row, as :mod:`kvpeer.transport.pull_server` does.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np

from kvpeer import __version__
from kvpeer.api.errors import KVPeerError
from kvpeer.api.wire import MAX_HEADER_BYTES, chunk_header, decode_chunk_header, digest
from kvpeer.bench.process import cpu_seconds
from kvpeer.bench.pull import PeerNodeProcess, bench_fingerprint, timed_pull
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PeerClient
from kvpeer.transport import frames
from kvpeer.transport.connection import WINDOW
from kvpeer.v1 import peer_pb2

SEED = 7


class H2LibPull:
    """Pull calls to a kvpeer pull port over one ``h2`` library connection, one call at a time."""

    def __init__(
        self, host: str, port: int, chunk_bytes: int, max_frame: int, recv_bytes: int
    ) -> None:
        self.chunk_bytes = chunk_bytes
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(recv_bytes)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
            }
        )
        self.conn.increment_flow_control_window(WINDOW - frames.DEFAULT_WINDOW)
        self.sock.sendall(self.conn.data_to_send())
        acked = False
        while not acked:  # the new settings apply once the server acknowledges them
            acked = any(isinstance(e, h2.events.SettingsAcknowledged) for e in self._receive())
        self.headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", frames.PULL_PATH),
            (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", f"kvpeer-h2lib-bench/{__version__}"),
        ]

    def _receive(self) -> list[h2.events.Event]:
        received = self.sock.recv_into(self.buf)
        if not received:
            raise KVPeerError("the server closed the connection")
        return self.conn.receive_data(memoryview(self.buf)[:received])

    def pull(self, lease_id: str, indices: Sequence[int], keys: Sequence[bytes], dest: memoryview):
        """One Pull call of ``indices``; each row into ``dest[index]``, digest checked."""
        conn, chunk_bytes = self.conn, self.chunk_bytes
        request = peer_pb2.PullRequest(lease_id=lease_id, indices=list(indices)).SerializeToString()
        stream = conn.get_next_available_stream_id()
        timeout = ("grpc-timeout", frames.encode_grpc_timeout(60.0))
        conn.send_headers(stream, [*self.headers, timeout])
        conn.send_data(stream, b"\0" + len(request).to_bytes(4, "big") + request, end_stream=True)
        self.sock.sendall(conn.data_to_send())
        head = bytearray()  # the gRPC prefix and the Chunk header of the current message
        need = frames.GRPC_PREFIX_BYTES  # bytes of `head` still wanted
        row: memoryview | None = None  # the current row's data, while it arrives
        row_pos, row_index, row_digest, pending = 0, -1, b"", set(indices)
        status: str | None = None
        while status is None:
            for event in self._receive():
                if isinstance(event, h2.events.DataReceived):
                    data, pos = event.data, 0
                    while pos < len(data):
                        if row is None:  # prefix or header bytes
                            take = min(need, len(data) - pos)
                            head += data[pos : pos + take]
                            pos, need = pos + take, need - take
                            if need:
                                continue
                            if len(head) == frames.GRPC_PREFIX_BYTES:
                                length = int.from_bytes(head[1:5], "big")
                                need = length - chunk_bytes
                                if head[0] or not 0 < need <= MAX_HEADER_BYTES:
                                    raise KVPeerError(f"a message of {length} bytes is not a row")
                                continue
                            header = decode_chunk_header(memoryview(head)[5:])
                            if header.index not in pending or header.key != keys[header.index]:
                                raise KVPeerError(f"unexpected row {header.index}")
                            start = header.index * chunk_bytes
                            row, row_pos = dest[start : start + chunk_bytes], 0
                            row_index, row_digest = header.index, header.digest
                        else:  # row bytes: copied into place
                            take = min(chunk_bytes - row_pos, len(data) - pos)
                            row[row_pos : row_pos + take] = data[pos : pos + take]
                            pos, row_pos = pos + take, row_pos + take
                            if row_pos == chunk_bytes:
                                if digest(row) != row_digest:
                                    raise KVPeerError("digest mismatch")
                                pending.discard(row_index)
                                row, head, need = None, bytearray(), frames.GRPC_PREFIX_BYTES
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    status = dict(event.headers).get(b"grpc-status", b"?").decode()
                elif isinstance(event, h2.events.ResponseReceived):
                    fields = dict(event.headers)
                    if b"grpc-status" in fields:  # trailers-only
                        status = fields[b"grpc-status"].decode()
                elif isinstance(event, h2.events.StreamReset):
                    raise KVPeerError(f"the server reset the stream ({event.error_code!r})")
            out = conn.data_to_send()
            if out:
                self.sock.sendall(out)
        if status != "0" or pending:
            raise KVPeerError(f"pull ended with grpc-status {status}, {len(pending)} rows missing")

    def close(self) -> None:
        self.conn.close_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.sock.close()


def timed_h2lib_pull(
    client: PeerClient, h2lib: H2LibPull, keys: Sequence[bytes], dest: np.ndarray
) -> float:
    """Lookup + an h2-library Pull of every key into ``dest`` + release, as :func:`timed_pull`."""
    started = time.perf_counter()
    answer = client.lookup(keys, hold=True)
    if not all(answer.hits):
        raise KVPeerError(f"{answer.hits.count(False)} of {len(keys)} keys missed")
    h2lib.pull(answer.lease_id, range(len(keys)), keys, memoryview(dest).cast("B"))
    client.release(answer.lease_id)
    return time.perf_counter() - started


def send_rate(
    rows: np.ndarray, send: Callable[[socket.socket, memoryview], None]
) -> tuple[float, float]:
    """GB/s and sender CPU-s/GB of ``send`` for every row over a socketpair drained by a thread."""
    a, b = socket.socketpair()
    total = rows.nbytes

    def drain() -> None:
        sink = memoryview(bytearray(1 << 20))
        left = total
        while left > 0:
            left -= b.recv_into(sink)

    reader = threading.Thread(target=drain)
    reader.start()
    started, cpu = time.perf_counter(), time.thread_time()
    for row in rows:
        send(a, memoryview(row))
    cpu = time.thread_time() - cpu
    reader.join()
    seconds = time.perf_counter() - started
    a.close()
    b.close()
    return total / seconds / 1e9, cpu / (total / 1e9)


def server_side(rows: np.ndarray, max_frame: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median GB/s and CPU-s/GB of sending the rows: kvpeer's sendmsg against h2's send_data."""
    header = b"\0" * 5 + chunk_header(0, bytes(36), bytes(16), rows.shape[1])

    def kvpeer_send(sock: socket.socket, row: memoryview) -> None:
        view = memoryview(frames.frame_header(len(header) + len(row), frames.DATA, 0, 1) + header)
        parts = [view, row]  # one sendmsg from the row itself, as pull_server does
        while parts:
            sent = sock.sendmsg(parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][sent:]

    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: frames.MAX_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
        }
    )
    client.increment_flow_control_window(frames.MAX_WINDOW - frames.DEFAULT_WINDOW)
    client.send_headers(
        1, [(":method", "POST"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    )
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    server.data_to_send()

    def h2_send(sock: socket.socket, row: memoryview) -> None:
        server.send_data(1, header)
        step = server.max_outbound_frame_size  # send_data does not split: the caller must
        for start in range(0, len(row), step):
            server.send_data(1, row[start : start + step])
        sock.sendall(server.data_to_send())
        server.increment_flow_control_window(len(header) + len(row))  # as the peer's updates would
        server.increment_flow_control_window(len(header) + len(row), stream_id=1)

    results: dict[str, list[tuple[float, float]]] = {"sendmsg": [], "h2_send_data": []}
    for _ in range(repeat):
        results["sendmsg"].append(send_rate(rows, kvpeer_send))
        results["h2_send_data"].append(send_rate(rows, h2_send))
    return {
        name: {
            "gbps": statistics.median(s[0] for s in samples),
            "cpu_s_per_gb": statistics.median(s[1] for s in samples),
        }
        for name, samples in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=128, help="rows per pull")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="size of one row")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--h2-max-frame",
        type=int,
        default=frames.DEFAULT_MAX_FRAME,
        help="h2 client's SETTINGS_MAX_FRAME_SIZE",
    )
    parser.add_argument(
        "--h2-recv", type=int, default=1 << 18, help="h2 client's recv_into buffer, bytes"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)

    chunk_bytes = int(args.chunk_mib * (1 << 20))
    total = args.chunks * chunk_bytes
    expected = synthetic_rows(args.chunks, chunk_bytes, SEED)
    keys = synthetic_keys(args.chunks, SEED)
    dest = np.empty_like(expected)
    names = ("kvpeer", "h2lib")
    gbps: dict[str, list[float]] = {n: [] for n in names}
    client_cpu: dict[str, list[float]] = {n: [] for n in names}
    server_cpu: dict[str, list[float]] = {n: [] for n in names}
    print(
        f"pulling {total / 2**20:.0f} MiB in {args.chunks} rows of {chunk_bytes} bytes, "
        f"{args.repeat} interleaved repetitions (medians)"
    )
    with PeerNodeProcess(args.chunks, chunk_bytes, SEED) as node:
        client = PeerClient(
            node.endpoint,
            node_id="bench-h2lib",
            fingerprint=bench_fingerprint(chunk_bytes),
            chunk_bytes=chunk_bytes,
            pull_transport="h2",
        )
        info = client.handshake()
        if not info.pull_port:
            raise SystemExit("the peer server advertised no pull port")
        h2lib = H2LibPull("127.0.0.1", info.pull_port, chunk_bytes, args.h2_max_frame, args.h2_recv)
        transfers = {
            "kvpeer": lambda: timed_pull(client, keys, dest, streams=1),
            "h2lib": lambda: timed_h2lib_pull(client, h2lib, keys, dest),
        }
        for repetition in range(args.repeat):
            order = names if repetition % 2 == 0 else names[::-1]
            for name in order:
                dest.fill(0)
                server_before, client_before = cpu_seconds(node.pid), time.process_time()
                seconds = transfers[name]()
                server_after, client_after = cpu_seconds(node.pid), time.process_time()
                if not np.array_equal(dest, expected):
                    raise SystemExit(f"{name} delivered wrong bytes")
                gbps[name].append(total / seconds / 1e9)
                client_cpu[name].append((client_after - client_before) / (total / 1e9))
                server_cpu[name].append((server_after - server_before) / (total / 1e9))
            print(
                f"  repetition {repetition + 1}: "
                + ", ".join(f"{n} {gbps[n][-1]:.2f} GB/s" for n in names)
            )
        h2lib.close()
        client.close()

    medians = {n: statistics.median(gbps[n]) for n in names}
    paired = statistics.median(h / k for h, k in zip(gbps["h2lib"], gbps["kvpeer"], strict=True))
    print(f"{'client':<8} {'median GB/s':>12} {'client CPU-s/GB':>16} {'server CPU-s/GB':>16}")
    for n in names:
        print(
            f"{n:<8} {medians[n]:>12.2f} {statistics.median(client_cpu[n]):>16.2f}"
            f" {statistics.median(server_cpu[n]):>16.2f}"
        )
    print(f"h2lib / kvpeer: {medians['h2lib'] / medians['kvpeer']:.0%} (paired {paired:.0%})")
    sending = server_side(expected[: min(args.chunks, 64)], args.h2_max_frame, args.repeat)
    print("server side, 2 MiB rows over a socketpair:")
    for name, result in sending.items():
        print(
            f"  {name:<13} {result['gbps']:>6.2f} GB/s {result['cpu_s_per_gb']:>6.2f} sender CPU-s/GB"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "total_bytes": total,
                    "chunk_bytes": chunk_bytes,
                    "h2_max_frame": args.h2_max_frame,
                    "h2_recv_bytes": args.h2_recv,
                    "samples_gbps": gbps,
                    "median_gbps": medians,
                    "h2lib_over_kvpeer": medians["h2lib"] / medians["kvpeer"],
                    "median_paired_h2lib_over_kvpeer": paired,
                    "client_cpu_s_per_gb": client_cpu,
                    "server_cpu_s_per_gb": server_cpu,
                    "server_side_send": sending,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
