"""A real local Redis Cluster for tests and benchmarks: 3 primaries, optionally 3 replicas.

:class:`RedisCluster` starts ``redis-server --cluster-enabled yes`` processes on free
loopback ports, each in a private temp dir, joins them with ``redis-cli --cluster
create`` (``--cluster-replicas 1`` when asked) and waits until every node reports
``cluster_state:ok``. :meth:`RedisCluster.kill_primary_of` SIGKILLs the primary that
owns a key's slot and waits for its replica to take over (``cluster-node-timeout``
is 1 s here).
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.support.redis_server import REDIS_SERVER

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 1000


def _free_cluster_port(taken: set[int]) -> int:
    """A port whose cluster bus port (port + 10000) is free too, so at most 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """``primaries`` primaries (3: the least ``redis-cli --cluster create`` accepts), each
    with ``replicas_each`` replicas. Use as a context manager."""

    def __init__(self, *, replicas_each: int = 0, start_timeout_s: float = 30.0) -> None:
        self.replicas_each = replicas_each
        self.ports: list[int] = []
        for _ in range(3 * (1 + replicas_each)):
            self.ports.append(_free_cluster_port({*self.ports, *(p + 10000 for p in self.ports)}))
        self._dir = Path(tempfile.mkdtemp(prefix="kvpeer-redis-cluster-"))
        self._timeout = start_timeout_s
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def pids(self) -> list[int]:
        """The live nodes' process ids."""
        return [proc.pid for proc in self._procs.values()]

    @property
    def url(self) -> str:
        """The store URL a directory takes (every node given as a startup node)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/"

    def start(self) -> RedisCluster:
        for i in range(len(self.ports)):
            for _ in range(3):  # a port another process took since it was picked
                port = self.ports[i]
                (self._dir / str(port)).mkdir()
                if self._spawn(port):
                    break
                taken = {*self.ports, *(p + 10000 for p in self.ports)}
                self.ports[i] = _free_cluster_port(taken)
            else:
                raise RuntimeError(f"redis cluster: no node started; see {self._dir}/*/log")
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas_each),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=self._timeout,
        )
        self._wait(self._healthy, "cluster_state:ok on every node")
        return self

    def primary_of(self, key: bytes | str) -> int:
        """The port of the primary that owns ``key``'s slot (as the first live node sees it)."""
        return self._owner(self._live()[0], self._slot(key))

    def kill_primary_of(self, key: bytes | str) -> int:
        """SIGKILL the primary of ``key``'s slot; wait until a replica owns the slot."""
        port = self.primary_of(key)
        self._procs[port].send_signal(signal.SIGKILL)
        self._procs[port].wait()
        del self._procs[port]
        self._wait(
            lambda: (
                all(self._owner(p, self._slot(key)) != port for p in self._live())
                and self._healthy(replicated=False)
            ),
            "a replica promoted",
        )
        return port

    def kill_replica_of(self, key: bytes | str) -> int:
        """SIGKILL the replica of the primary that owns ``key``'s slot; its port."""
        primary = self.primary_of(key)
        for port in self._live():
            info = self._client(port).info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == primary:
                self._procs.pop(port).kill()
                return port
        raise AssertionError(f"the primary on {primary} has no replica")

    def client_of(self, key: bytes | str) -> redis.Redis:
        """A plain client of the primary that owns ``key``'s slot."""
        return self._client(self.primary_of(key))

    def flush(self) -> None:
        """Empty every primary (FLUSHALL), e.g. between two directory layouts."""
        for port in self._live():
            if self._client(port).info("replication")["role"] == "master":
                self._client(port).flushall()

    def uncover_slot(self, slot: int) -> None:
        """Unassign ``slot`` on every node (CLUSTER DELSLOTS): no node serves it any more."""
        for port in self._live():
            self._client(port).execute_command("CLUSTER", "DELSLOTS", slot)
        self._wait(
            lambda: all(
                b"cluster_slots_assigned:16383"
                in self._client(p).execute_command("CLUSTER", "INFO")
                for p in self._live()
            ),
            f"slot {slot} uncovered on every node",
        )

    def restart(self, port: int) -> None:
        """Start the killed node again (same port and dir: it rejoins, as a replica)."""
        if not self._spawn(port):
            raise RuntimeError(f"redis cluster: node {port} did not restart; see its log")
        self._wait(self._healthy, f"node {port} back as a replica")

    def close(self) -> None:
        for proc in self._procs.values():
            proc.kill()
            proc.wait()
        self._procs.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------

    def _spawn(self, port: int) -> bool:
        """Start the node on ``port``; False if it exited at once (port taken)."""
        args = [
            REDIS_SERVER,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self._dir / str(port)),
            "--protected-mode", "no",
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--appendonly", "no",
            "--save", "",
        ]  # fmt: skip
        log = open(self._dir / str(port) / "log", "ab")  # noqa: SIM115 - the node keeps it
        proc = self._procs[port] = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()

        def up() -> bool:
            if proc.poll() is not None:
                return True
            return bool(self._client(port).ping())

        self._wait(up, f"node {port} up")
        if proc.poll() is not None:
            del self._procs[port]
            return False
        return True

    def _live(self) -> list[int]:
        return list(self._procs)

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def _slot(self, key: bytes | str) -> int:
        return int(self._client(self._live()[0]).cluster("keyslot", key))

    def _owner(self, port: int, slot: int) -> int:
        for start, end, primary, *_ in self._client(port).cluster("slots"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} has no owner")

    def _healthy(self, *, replicated: bool = True) -> bool:
        """Every live node says cluster_state:ok (and, if ``replicated``, has its replicas)."""
        try:
            for port in self._live():
                client = self._client(port)
                if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
                info = client.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
                serving = replicated and self.replicas_each and info["role"] == "master"
                if serving and self._serving(port) and info.get("connected_slaves", 0) < 1:
                    return False
            return True
        except redis.RedisError:
            return False

    def _serving(self, port: int) -> bool:
        """True if the node at ``port`` owns slots (a primary with a live replica to wait on)."""
        return any(
            int(primary[1]) == port for _, _, primary, *_ in self._client(port).cluster("slots")
        )

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"redis cluster: {what} within {self._timeout} s")
