"""A real ``redis-server`` for tests and benchmarks: free port, private temp dir, restartable.

Used by the directory's tests (``tests/test_directory*.py``) and by
``benchmarks/directory_throughput.py``. ``RedisServer.stop`` then ``start`` keeps
the port, so clients configured with :attr:`RedisServer.url` reconnect to the new
process; with ``appendonly=True`` the data survives the restart, without it the
new process starts empty.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; use as a context manager or start/stop."""

    def __init__(self, *, appendonly: bool = False, start_timeout_s: float = 15.0) -> None:
        self.appendonly = appendonly
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="kvpeer-redis-"))
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        if self.running:
            return self
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", str(self._dir / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self._timeout
        with self.client() as probe:
            while True:
                if self._proc.poll() is not None:
                    log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server exited ({self._proc.returncode}): {log}")
                try:
                    if probe.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on {self.port} in time")
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); the port and data dir stay reserved."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server with append-only persistence (survives :meth:`RedisServer.stop`)."""
    server = RedisServer(appendonly=True)
    try:
        yield server.start()
    finally:
        server.close()
