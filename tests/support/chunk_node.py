"""A peer chunk server in its own process, so a test can SIGKILL it mid-transfer.

Run as a script, it serves a :class:`~kvpeer.server.peer.service.PeerServer` over an
:class:`~kvpeer.server.peer.array_source.ArrayChunkSource` full of the synthetic rows of
:mod:`kvpeer.bench.rows` (so the test knows every byte without receiving it),
prints one JSON line ``{"port": ...}`` once it serves, and runs until SIGTERM
(clean stop) or SIGKILL.

From a test, :class:`ChunkNode` starts it and waits for that line:

    with ChunkNode(num_chunks=8, chunk_bytes=1 << 20, seed=3) as node:
        client = PeerClient(node.endpoint, ...)
        node.kill()          # SIGKILL, no goodbye
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Fingerprint ingredients of a chunk node unless told otherwise.
DEFAULT_INGREDIENTS: Mapping[str, str] = {"model": "kvpeer/test-node", "protocol_version": "1"}


class ChunkNode:
    """A chunk server subprocess (see the module docstring). Stops on ``with`` exit.

    Args:
        num_chunks, chunk_bytes, seed: the synthetic rows it serves
            (:func:`kvpeer.bench.rows.synthetic_source`).
        ingredients: its fingerprint's ingredients.
        extra_args: more command-line options (``--lease-ttl``, ``--tls-cert``, ...).
        start_timeout_s: how long to wait for it to serve.
    """

    def __init__(
        self,
        *,
        num_chunks: int,
        chunk_bytes: int,
        seed: int = 1,
        ingredients: Mapping[str, str] = DEFAULT_INGREDIENTS,
        node_id: str = "chunk-node",
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 60.0,
    ) -> None:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--chunks={num_chunks}",
            f"--chunk-bytes={chunk_bytes}",
            f"--seed={seed}",
            f"--node-id={node_id}",
            f"--ingredients={json.dumps(dict(ingredients))}",
            *extra_args,
        ]
        # stderr goes to a file: nobody reads it unless the node fails to start.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by kill()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        try:
            self.port = self._read_port(start_timeout_s)
        except BaseException:
            self.kill()
            raise

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL the process and reap it; idempotent."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._close_pipes()

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL if it lingers; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        self.kill()

    def __enter__(self) -> ChunkNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _read_port(self, timeout_s: float) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.process.stdout.readline()
                    if line:
                        return int(json.loads(line)["port"])
                if self.process.poll() is not None:
                    break
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        raise RuntimeError(f"chunk node did not start within {timeout_s}s: {stderr[-2000:]}")

    def _close_pipes(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve synthetic chunk rows over KVPeer")
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--node-id", default="chunk-node")
    parser.add_argument("--ingredients", default=json.dumps(dict(DEFAULT_INGREDIENTS)))
    parser.add_argument("--lease-ttl", type=float, default=30.0)
    parser.add_argument("--max-lookup-wait", type=float, default=10.0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca")
    parser.add_argument("--token-file")
    args = parser.parse_args(argv)

    from kvpeer.api.fingerprint import Fingerprint
    from kvpeer.api.security import Security
    from kvpeer.bench.rows import synthetic_source
    from kvpeer.server.peer.service import PeerServer

    tls = {
        name: value
        for name, value in (("cert", args.tls_cert), ("key", args.tls_key), ("ca", args.tls_ca))
        if value
    }
    security = Security.from_config(tls or None, args.token_file)
    source, _ = synthetic_source(args.chunks, args.chunk_bytes, args.seed)
    server = PeerServer(
        source,
        node_id=args.node_id,
        fingerprint=Fingerprint(json.loads(args.ingredients)),
        security=security,
        lease_ttl_s=args.lease_ttl,
        max_lookup_wait_s=args.max_lookup_wait,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"port": server.port, "pid": os.getpid()}), flush=True)
    stop.wait()
    server.stop(grace=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
