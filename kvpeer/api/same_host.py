"""Same-host identity: which kernel a node runs on, and which shared-memory file its rows are in.

Both sides of the same-host fast path use this module:

- :func:`this_host` is what a node says about its machine in the handshake
  (``kvpeer.v1.Host``): the kernel's boot id (``/proc/sys/kernel/random/boot_id``,
  the same in every container of one host) and the host name. Two nodes are on
  one host only when the boot ids are equal; the host name is for logs.
- :class:`SharedRegion` describes the file a node's rows are mapped from
  (``kvpeer.v1.Region``): path, size, ``st_dev``/``st_ino``, engine id, row size.
  The holder finds it from its own mapping (:func:`region_of_buffer`, which reads
  ``/proc/self/maps``, so it names the file actually mapped, not whatever the path
  names now) and re-checks the path at every handshake (:meth:`SharedRegion.still_at_path`).
  A consumer opens the path and accepts it only when its identity matches
  (:meth:`SharedRegion.matches`).

Nothing here reads a row; :mod:`kvpeer.client.same_host` does the copying.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
from dataclasses import dataclass
from functools import lru_cache

from kvpeer.v1 import peer_pb2

#: Only files under this directory are opened or offered (vLLM's primary tier lives there).
SHM_DIR = "/dev/shm"
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_MAX_PATH = 4096
_MAX_ENGINE_ID = 256


@dataclass(frozen=True)
class Host:
    """A node's machine: kernel boot id (empty when unreadable) and host name."""

    boot_id: str
    hostname: str

    def to_proto(self) -> peer_pb2.Host:
        return peer_pb2.Host(boot_id=self.boot_id, hostname=self.hostname)

    @classmethod
    def from_proto(cls, message: peer_pb2.Host) -> Host:
        return cls(message.boot_id[:64], message.hostname[:256])

    def same_kernel(self, other: Host) -> bool:
        """True when both boot ids are known and equal (one kernel, one /dev/shm possible)."""
        return bool(self.boot_id) and self.boot_id == other.boot_id


@lru_cache(maxsize=1)
def this_host() -> Host:
    """This process's :class:`Host` (read once)."""
    try:
        with open(_BOOT_ID_PATH) as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return Host(boot_id, socket.gethostname())


@dataclass(frozen=True)
class SharedRegion:
    """A shared-memory file that holds a node's rows, and where they start in it.

    ``file_offset`` and ``base_address`` are the holder's own (the file offset and
    the address of the region's first byte in its process); they never go on the
    wire — :meth:`offset_of` turns a row view's address into a file offset.
    """

    path: str
    size: int
    st_dev: int
    st_ino: int
    engine_id: str
    row_bytes: int
    num_rows: int
    base_address: int = 0
    file_offset: int = 0

    # -- wire ------------------------------------------------------------------

    def to_proto(self) -> peer_pb2.Region:
        return peer_pb2.Region(
            path=self.path,
            size=self.size,
            st_dev=self.st_dev,
            st_ino=self.st_ino,
            engine_id=self.engine_id,
            row_bytes=self.row_bytes,
            num_rows=self.num_rows,
        )

    @classmethod
    def from_proto(cls, message: peer_pb2.Region) -> SharedRegion | None:
        """The region a peer described, or None when the description is unusable."""
        if (
            not message.path
            or len(message.path) > _MAX_PATH
            or len(message.engine_id) > _MAX_ENGINE_ID
            or not message.size
            or not message.row_bytes
        ):
            return None
        return cls(
            message.path,
            message.size,
            message.st_dev,
            message.st_ino,
            message.engine_id,
            message.row_bytes,
            message.num_rows,
        )

    def same_file(self, other: SharedRegion) -> bool:
        """Whether two descriptions name one file (identity, size and row geometry)."""
        return (
            self.path,
            self.size,
            self.st_dev,
            self.st_ino,
            self.engine_id,
            self.row_bytes,
        ) == (other.path, other.size, other.st_dev, other.st_ino, other.engine_id, other.row_bytes)

    # -- holder side -------------------------------------------------------------

    def offset_of(self, view: memoryview) -> int | None:
        """File offset of ``view``'s first byte if the whole view lies in this region."""
        address = buffer_address(view)
        start = address - self.base_address
        if start < 0 or start + view.nbytes > self.num_rows * self.row_bytes:
            return None
        return self.file_offset + start

    def still_at_path(self) -> bool:
        """Whether :attr:`path` still names the file this node mapped (not replaced or gone)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return self.matches(st)

    # -- both sides --------------------------------------------------------------

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` (of an opened file) is this region: same file, large enough."""
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_dev == self.st_dev
            and st.st_ino == self.st_ino
            and st.st_size >= self.size
        )

    def describe(self) -> str:
        return f"{self.path} (engine {self.engine_id or '?'}, inode {self.st_ino})"


def allowed_path(path: str) -> bool:
    """Whether a peer-named ``path`` may be opened: absolute, normalised, under :data:`SHM_DIR`."""
    return (
        os.path.isabs(path)
        and os.path.normpath(path) == path
        and os.path.dirname(path) == SHM_DIR
        and "\x00" not in path
    )


def buffer_address(view: memoryview | object) -> int:
    """Address of a buffer's first byte (read-only buffers too)."""
    with memoryview(view) as mv:  # type: ignore[arg-type]
        flat = mv.cast("B") if mv.ndim != 1 or mv.format not in ("B", "b", "c") else mv
        try:
            if flat.readonly:
                import numpy as np

                return int(np.frombuffer(flat, dtype=np.uint8).ctypes.data)
            return ctypes.addressof(ctypes.c_char.from_buffer(flat))
        finally:
            if flat is not mv:
                flat.release()


def region_of_buffer(
    view: memoryview | object, *, row_bytes: int, engine_id: str = ""
) -> tuple[SharedRegion | None, str]:
    """Describe the shared-memory file ``view`` is mapped from: ``(region, "")`` or ``(None, why)``.

    Looks the buffer's address range up in ``/proc/self/maps``: it must lie in one
    shared file mapping of a file under :data:`SHM_DIR` that its path still names.
    """
    with memoryview(view) as mv:  # type: ignore[arg-type]
        nbytes = mv.nbytes
    if not nbytes or nbytes % row_bytes:
        return None, f"the buffer ({nbytes} bytes) is not whole rows of {row_bytes}"
    address = buffer_address(view)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError as exc:
        return None, f"cannot read /proc/self/maps: {exc}"
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        span, perms, offset, dev, inode, path = parts
        low, high = (int(x, 16) for x in span.split("-"))
        if not low <= address < high:
            continue
        path = path.rstrip("\n")
        if address + nbytes > high:
            return None, "the buffer spans several mappings (a multi-segment region)"
        if "s" not in perms:
            return None, "the buffer is a private mapping, not a shared file"
        if path.endswith(" (deleted)"):
            return None, f"{path[: -len(' (deleted)')]} was unlinked"
        if not allowed_path(path):
            return (
                None,
                f"the buffer is not mapped from a file in {SHM_DIR} ({path or 'anonymous'})",
            )
        major, minor = (int(x, 16) for x in dev.split(":"))
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            return None, f"cannot stat {path}: {exc}"
        region = SharedRegion(
            path=path,
            size=st.st_size,
            st_dev=st.st_dev,
            st_ino=int(inode),
            engine_id=engine_id,
            row_bytes=row_bytes,
            num_rows=nbytes // row_bytes,
            base_address=address,
            file_offset=int(offset, 16) + (address - low),
        )
        if st.st_ino != int(inode) or os.major(st.st_dev) != major or os.minor(st.st_dev) != minor:
            return None, f"{path} now names another file than the one mapped"
        if region.file_offset + nbytes > st.st_size:
            return None, f"{path} is smaller than the mapped rows"
        return region, ""
    return None, "the buffer's address is in no mapping"


class RegionOffer:
    """A holder's answer to "which region do you offer?", worked out once, re-checked each time.

    :meth:`get` returns the region while its path still names the mapped file,
    else None; the reason of the first None (and of each change) is logged once.
    Thread-safe enough for handler threads: the worst race computes it twice.

    Args:
        view: the holder's rows (one buffer), as mapped in this process.
        row_bytes: bytes per row.
        engine_id: vLLM's engine id, for the peer's logs.
        enabled: False offers nothing (``same_host: off``).
    """

    def __init__(
        self,
        view: memoryview | object,
        *,
        row_bytes: int,
        engine_id: str = "",
        enabled: bool = True,
    ) -> None:
        self._view: memoryview | object | None = view if enabled else None
        self._row_bytes = row_bytes
        self._engine_id = engine_id
        self._region: SharedRegion | None = None
        self._why = "" if enabled else "same_host is off"
        self._logged = ""

    def get(self) -> SharedRegion | None:
        import logging

        if self._region is None and self._view is not None:
            self._region, self._why = region_of_buffer(
                self._view, row_bytes=self._row_bytes, engine_id=self._engine_id
            )
            self._view = None  # keep no export of the caller's buffer
        region = self._region
        why = self._why
        if region is not None and not region.still_at_path():
            region, why = None, f"{region.path} no longer names the file this node mapped"
        if why and why != self._logged:
            self._logged = why
            logging.getLogger(__name__).info(
                "kvpeer: no same-host fast path offered to peers: %s", why
            )
        return region
