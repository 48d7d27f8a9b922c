"""A chunk server process whose rows live in a ``/dev/shm`` file: the holder of same-host tests.

Run as a script it maps a fresh ``/dev/shm/kvpeer-test-<pid>.mmap`` file, fills it
with the synthetic rows of :mod:`kvpeer.bench.rows` through an
:class:`~kvpeer.server.peer.array_source.ArrayChunkSource` over that mapping (so
the server offers the file as its same-host region), prints one JSON line
``{"port", "path", "pid"}`` and serves until SIGTERM or SIGKILL.

``--fault`` makes it misbehave on its ``--after``-th call of ``region()`` (the
handshake makes one call, each MapRows one more), ``--delay`` seconds after
answering it, while the consumer copies:

- ``kill``: SIGKILL itself;
- ``reset``: revoke every lease and overwrite every row (vLLM's ``reset_cache``);
- ``replace``: put another file at the region's path (another engine's region);
- ``truncate-tail``: truncate the file to its first half (rows pulled lie there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

#: Rows a test pulls lie in the first half, which ``truncate-tail`` keeps.
FAULTS = ("none", "kill", "reset", "replace", "truncate-tail")


class ShmNode:
    """The script above as a subprocess; ``with`` exit stops it and removes its file.

    Args:
        num_chunks, chunk_bytes, seed: the synthetic rows it serves.
        extra_args: ``--fault``, ``--after``, ``--delay``, ``--lease-ttl``, ``--token-file``.
    """

    def __init__(
        self, *, num_chunks: int, chunk_bytes: int, seed: int = 1, extra_args: Sequence[str] = ()
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "tests.support.shm_node",
            f"--chunks={num_chunks}",
            f"--chunk-bytes={chunk_bytes}",
            f"--seed={seed}",
            *extra_args,
        ]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.kill()
            raise RuntimeError("shm node did not start within 60 s")
        info = json.loads(line)
        self.port: int = info["port"]
        self.path: str = info["path"]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def __enter__(self) -> ShmNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--after", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.002)
    parser.add_argument("--lease-ttl", type=float, default=30.0)
    parser.add_argument("--token-file")
    args = parser.parse_args(argv)

    import numpy as np

    from kvpeer.api.fingerprint import Fingerprint
    from kvpeer.api.same_host import SharedRegion
    from kvpeer.api.security import Security
    from kvpeer.bench.rows import synthetic_keys, synthetic_rows
    from kvpeer.server.peer.array_source import ArrayChunkSource
    from kvpeer.server.peer.service import PeerServer
    from tests.support.chunk_node import DEFAULT_INGREDIENTS

    size = args.chunks * args.chunk_bytes
    path = f"/dev/shm/kvpeer-test-{os.getpid()}.mmap"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    region_map = mmap.mmap(fd, size)
    server: PeerServer | None = None
    calls = 0

    def misbehave() -> None:
        time.sleep(args.delay)
        if args.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif args.fault == "reset":
            assert server is not None
            server.revoke_leases()
            np.frombuffer(region_map, dtype=np.uint8)[:] = 0xA5
        elif args.fault == "replace":
            os.unlink(path)
            other = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(other, size)
            os.write(other, b"another engine's rows" * 64)
            os.close(other)
        elif args.fault == "truncate-tail":
            os.ftruncate(fd, size // 2)

    class FaultySource(ArrayChunkSource):
        def region(self) -> SharedRegion | None:
            nonlocal calls
            answer = super().region()
            calls += 1
            if args.fault != "none" and calls == args.after:
                threading.Thread(target=misbehave, daemon=True).start()
            return answer

    source = FaultySource(args.chunks, args.chunk_bytes, buffer=memoryview(region_map))
    rows = synthetic_rows(args.chunks, args.chunk_bytes, args.seed)
    for i, key in enumerate(synthetic_keys(args.chunks, args.seed)):
        source.put_row(i, key, rows[i])
    server = PeerServer(
        source,
        node_id="shm-node",
        fingerprint=Fingerprint(DEFAULT_INGREDIENTS),
        security=Security.from_config(None, args.token_file),
        lease_ttl_s=args.lease_ttl,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"port": server.port, "path": path, "pid": os.getpid()}), flush=True)
    try:
        stop.wait()
        server.stop(grace=0.5)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
