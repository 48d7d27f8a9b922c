"""A real network for benchmarks: two network namespaces joined by a rate-limited veth pair.

Loopback moves bytes at memory speed, which flatters whatever saves copies.
:class:`VethLink` builds a link that behaves like a network card instead: two
namespaces ``<prefix>-a`` and ``<prefix>-b``, a veth pair between them, and a
``tc`` token-bucket filter (``tbf``) on both ends that caps each direction at
``rate_gbit``. Side ``a`` has :data:`ADDRESS_A`, side ``b`` :data:`ADDRESS_B`; the
interface is called :data:`DEVICE` on both sides.

The addresses come from 198.18.0.0/15, the block RFC 2544 reserves for network
benchmarks; they exist only inside the two namespaces, so no traffic leaves
this machine.

Running something inside a namespace: :meth:`VethLink.run_in` calls a function
in a fresh thread that has joined the namespace (``setns``), so sockets that
function opens live there, and processes it starts (``subprocess``,
``multiprocessing``) are born there — the child inherits the namespace of the
thread that forked it. Nothing else in the calling process changes namespace.

Teardown always runs: :meth:`VethLink.close` (also from ``with``, hence on
Ctrl-C) deletes both namespaces, which deletes the veth pair and its filters;
namespaces left by a run that was killed outright are removed by the next
:meth:`VethLink.create`.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable_reason` says why
the setting cannot run here, or returns None.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

from kvpeer.api.errors import KVPeerError

ADDRESS_A = "198.18.0.1"
ADDRESS_B = "198.18.0.2"
#: Name of the link's interface on both sides (e.g. for ``UCX_NET_DEVICES``).
DEVICE = "kvbench0"
_PREFIX_LEN = 30
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 0x80000
_MNT_DETACH = 2
_NETNS_DIR = "/var/run/netns"
_T = TypeVar("_T")


class NetnsError(KVPeerError):
    """The namespaces or the link could not be set up; the message says which step failed."""


def unavailable_reason() -> str | None:
    """Why a veth link cannot be built here (not root, no iproute2), or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2 ({' and '.join(missing)} not found; apt-get install iproute2)"
    return None


class VethLink:
    """Two namespaces joined by a veth pair capped at ``rate_gbit`` each way.

    ``prefix`` names the namespaces (``<prefix>-a``, ``<prefix>-b``); the default
    includes this process's id so that concurrent runs do not collide.
    """

    def __init__(self, rate_gbit: float, *, prefix: str | None = None, mtu: int = 1500) -> None:
        if rate_gbit <= 0:
            raise ValueError(f"rate_gbit must be positive, got {rate_gbit}")
        self.rate_gbit = rate_gbit
        self.mtu = mtu
        self.prefix = prefix or f"kvpeer-bench-{os.getpid()}"
        self.namespaces = {"a": f"{self.prefix}-a", "b": f"{self.prefix}-b"}
        self.addresses = {"a": ADDRESS_A, "b": ADDRESS_B}
        self._created = False
        # Interface names are at most 15 characters.
        self._devices = (f"kvb{os.getpid() % 1000000}a", f"kvb{os.getpid() % 1000000}b")

    def create(self) -> VethLink:
        """Build the namespaces, the link and the rate limit; undo everything on failure."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(f"cannot build the veth link: {reason}")
        _remove_stale_namespaces()
        ns_a, ns_b = self.namespaces["a"], self.namespaces["b"]
        dev_a, dev_b = self._devices
        self._created = True
        try:
            _ip("netns", "add", ns_a)
            _ip("netns", "add", ns_b)
            _ip("link", "add", dev_a, "mtu", str(self.mtu), "type", "veth", "peer", "name", dev_b)
            _ip("link", "set", dev_a, "netns", ns_a)
            _ip("link", "set", dev_b, "netns", ns_b)
            for side, ns, dev in (("a", ns_a, dev_a), ("b", ns_b, dev_b)):
                _ip("-n", ns, "link", "set", dev, "name", DEVICE)
                _ip("-n", ns, "addr", "add", f"{self.addresses[side]}/{_PREFIX_LEN}", "dev", DEVICE)
                _ip("-n", ns, "link", "set", DEVICE, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _run("tc", "-n", ns, "qdisc", "add", "dev", DEVICE, "root", "tbf", *self._tbf())
        except BaseException:
            self.close()
            raise
        return self

    def _tbf(self) -> list[str]:
        """tbf arguments: the rate, a burst of ~1 ms at that rate, a 10 ms queue."""
        bytes_per_ms = int(self.rate_gbit * 1e9 / 8 / 1000)
        burst = max(bytes_per_ms, 64 * 1024)
        return ["rate", f"{self.rate_gbit}gbit", "burst", str(burst), "latency", "10ms"]

    def describe(self) -> str:
        return (
            f"veth {self.addresses['a']} <-> {self.addresses['b']}, "
            f"tbf {self.rate_gbit:g} Gbit/s each way, MTU {self.mtu}"
        )

    @property
    def link_bytes_per_s(self) -> float:
        """The rate limit in bytes/s (what 100% of the link means)."""
        return self.rate_gbit * 1e9 / 8

    def run_in(self, side: str, fn: Callable[[], _T]) -> _T:
        """Call ``fn()`` in a thread inside namespace ``side`` ('a' or 'b'); return its result.

        Raises whatever ``fn`` raised. Processes ``fn`` starts stay in that namespace.
        """
        if not self._created:
            raise NetnsError("create() the link first")
        path = os.path.join(_NETNS_DIR, self.namespaces[side])
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                _enter_namespace(path)
                outcome["value"] = fn()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{side}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    def close(self) -> None:
        """Delete both namespaces (and with them the link). Idempotent, never raises."""
        if not self._created:
            return
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        # Only left in this namespace when set-up failed before moving it.
        subprocess.run(["ip", "link", "del", self._devices[0]], capture_output=True, check=False)
        self._created = False

    def __enter__(self) -> VethLink:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def mount_own_sysfs(tag: str = "kvpeer-bench") -> None:
    """Give this process a private ``/sys`` that lists its own namespace's interfaces.

    A process born inside a namespace by :meth:`VethLink.run_in` still sees the
    host's ``/sys/class/net``; libraries that pick network devices from sysfs (UCX
    does) then find the wrong ones. This does what ``ip netns exec`` does: a
    private mount namespace with sysfs mounted afresh. Call it first thing in a
    child process, while it has one thread; needs root.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    steps = (
        ("unshare(CLONE_NEWNS)", lambda: libc.unshare(_CLONE_NEWNS)),
        (
            "mount --make-rslave /",
            lambda: libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None),
        ),
        ("umount /sys", lambda: libc.umount2(b"/sys", _MNT_DETACH)),
        ("mount sysfs /sys", lambda: libc.mount(tag.encode(), b"/sys", b"sysfs", 0, None)),
    )
    for what, call in steps:
        if call() != 0:
            raise NetnsError(f"{what} failed: {os.strerror(ctypes.get_errno())}")


def _enter_namespace(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetnsError(f"setns({path}) failed: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _remove_stale_namespaces() -> None:
    """Delete ``kvpeer-bench-<pid>-*`` namespaces whose process no longer runs."""
    try:
        names = os.listdir(_NETNS_DIR)
    except FileNotFoundError:
        return
    for name in names:
        parts = name.split("-")
        ours = len(parts) == 4 and parts[:2] == ["kvpeer", "bench"] and parts[2].isdigit()
        if ours and not os.path.exists(f"/proc/{parts[2]}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _ip(*args: str) -> None:
    _run("ip", *args)


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"'{' '.join(command)}' failed: {result.stderr.strip()}")
