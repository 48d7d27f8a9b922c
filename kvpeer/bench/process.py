"""A benchmark's server side in its own process, so sender and receiver do not share a GIL.

``ServerProcess(target, *args)`` spawns ``target(conn, *args)`` with the ``spawn``
start method. The target binds a port, sends it through ``conn``, then serves
until the process is terminated; the parent reads the port with a deadline.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from kvpeer.api.errors import KVPeerError


class ServerProcess:
    """A started server process; :meth:`stop` ends it (also on ``with`` exit)."""

    def __init__(
        self, target: Callable[..., None], *args: Any, start_timeout_s: float = 120.0
    ) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=False)
        self._process = context.Process(target=target, args=(child, *args), daemon=True)
        self._process.start()
        child.close()
        try:
            if not parent.poll(start_timeout_s):
                raise KVPeerError(f"{target.__name__} did not report its port in time")
            self.port: int = parent.recv()
        except (EOFError, KVPeerError) as exc:
            self.stop()
            raise KVPeerError(f"{target.__name__} failed to start: {exc}") from exc
        finally:
            parent.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def stop(self) -> None:
        """Terminate the process and wait for it; idempotent."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
        self._process.join()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def report_port(conn: Connection, port: int) -> None:
    """Called by a target once it serves: hands ``port`` to the parent."""
    conn.send(port)
    conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
