"""``kvpeer directory`` as a child process, for the demo, the benchmarks and the tests.

:class:`DirectoryProcess` runs the real command (``python -m kvpeer directory``)
on loopback, reads its ready line for the ports, keeps its log in a file (a pipe
nobody reads would fill and block it), and can stop it cleanly (SIGTERM), kill
it (SIGKILL) and start it again on the same port — a directory restart as the
nodes see it.
"""

from __future__ import annotations

import re
import selectors
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from kvpeer.api.errors import KVPeerError

_READY = re.compile(r"ready on (\S+):(\d+) .*?(?:metrics :(\d+))?\)$")


class DirectoryProcess:
    """A started ``kvpeer directory`` on ``host`` (a free port unless ``port`` is given).

    Args:
        host: the loopback address to listen on (127.0.0.1; 127.0.0.2 and so on for
            several replicas behind one name).
        extra_args: more command-line flags (``--store``, ``--lease-ttl``, TLS...).
        metrics: serve ``/metrics`` on a free port (see :attr:`metrics_port`).
        python_args: how to start the ``kvpeer`` command line (a test may wrap it).
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics: bool = True,
        start_timeout_s: float = 60.0,
        python_args: Sequence[str] = ("-m", "kvpeer"),
    ) -> None:
        self._extra_args = list(extra_args)
        self._metrics = metrics
        self._python_args = list(python_args)
        self._start_timeout_s = start_timeout_s
        self.host = host
        self.port = port
        self.metrics_port: int | None = None
        # The log goes to a file: a pipe nobody reads would fill and block the server.
        self._log = tempfile.TemporaryFile(mode="w+t")  # noqa: SIM115 - closed by close()
        self._proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> DirectoryProcess:
        """(Re)start the process on :attr:`port` (the one it got the first time)."""
        args = [
            sys.executable,
            *self._python_args,
            "directory",
            "--listen",
            f"{self.host}:{self.port}",
        ]
        if self._metrics:
            args += ["--metrics-port", str(self.metrics_port or 0)]
        self._proc = subprocess.Popen(
            [*args, *self._extra_args], stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        line = self._read_ready_line(self._start_timeout_s)
        match = _READY.search(line)
        if match is None:
            self.stop()
            raise KVPeerError(f"kvpeer directory did not start: {line or self.stderr()}")
        self.port = int(match.group(2))
        self.metrics_port = int(match.group(3)) if match.group(3) else None
        return self

    def _read_ready_line(self, timeout_s: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                return ""
        return self._proc.stdout.readline().strip()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stderr(self) -> str:
        """What the process has written to stderr (its log) so far."""
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout_s``); return the exit code. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: the directory dies without a word to anyone (its memory store is lost)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> DirectoryProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
