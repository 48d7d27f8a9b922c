"""Certificate rotation without a restart: servers re-read their PEM files when they change.

A server's ``tls.cert``, ``tls.key`` and ``tls.ca`` files are watched (their
``stat`` is checked at most every :data:`CHECK_INTERVAL_S`, at the next TLS
handshake) and re-read when one changes, or at once after :func:`reload_now`
(the CLIs call it on SIGHUP). Connections already open keep their session, so
rotation drops no call and no cache; new handshakes use the new files.

- gRPC ports use :func:`grpc.dynamic_ssl_server_credentials`, whose fetcher grpc
  calls before each handshake (:func:`dynamic_server_credentials`);
- the pull port's :class:`ssl.SSLContext` gets a ``sni_callback`` that loads the new
  chain into it (:func:`watch_ssl_context`); a new ``tls.ca`` is *added* to the
  trusted set there (``ssl`` cannot remove one until a restart).

A half-written or mismatched set (key not matching the certificate) is ignored
and retried; the old files stay in use and one warning is logged (paths only,
never the PEM contents).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

#: Least time between two ``stat`` checks of one watcher's files.
CHECK_INTERVAL_S = 0.5

_watchers: weakref.WeakSet[PemWatcher] = weakref.WeakSet()
_watchers_lock = threading.Lock()


def reload_now() -> None:
    """Make every watcher re-read its files at its next handshake (for SIGHUP handlers)."""
    with _watchers_lock:
        for watcher in list(_watchers):
            watcher.force()


class PemWatcher:
    """Watches PEM files named ``cert``/``key``/``ca``; :meth:`changed` returns new contents.

    Thread-safe. ``paths`` maps a name to a path; the first read happens at creation.
    """

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = dict(paths)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._forced = False
        self._stamps = self._stat()
        self._warned: tuple[object, ...] | None = None
        with _watchers_lock:
            _watchers.add(self)

    def force(self) -> None:
        with self._lock:
            self._forced = True

    def _stat(self) -> tuple[object, ...]:
        stamps: list[object] = []
        for name in sorted(self._paths):
            try:
                st = os.stat(Path(self._paths[name]).expanduser())
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def changed(self) -> dict[str, bytes] | None:
        """The files' new contents if they changed (and load together), else None."""
        with self._lock:
            now = time.monotonic()
            if not self._forced and now - self._checked < CHECK_INTERVAL_S:
                return None
            self._checked = now
            forced, self._forced = self._forced, False
            stamps = self._stat()
            if stamps == self._stamps and not forced:
                return None
            try:
                files = {
                    name: Path(path).expanduser().read_bytes() for name, path in self._paths.items()
                }
                if "cert" in files:
                    _check_pair(files["cert"], files["key"])
            except (OSError, ssl.SSLError, ValueError) as exc:
                if self._warned != stamps:
                    log.warning(
                        "certificate reload: %s unusable, keeping the old ones (%s)",
                        ", ".join(self._paths.values()),
                        type(exc).__name__,
                    )
                    self._warned = stamps
                return None
            self._stamps = stamps
            log.info("certificate reload: new %s", ", ".join(sorted(files)))
            return files


def _check_pair(cert: bytes, key: bytes) -> None:
    """Raise ssl.SSLError unless ``key`` is the private key of ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain(context, cert, key)


def load_cert_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a PEM certificate and key held in memory (``ssl`` reads chains from files only)."""
    with tempfile.TemporaryDirectory(prefix="kvpeer-tls-") as directory:
        cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)


def dynamic_server_credentials(
    cert: bytes, key: bytes, ca: bytes | None, paths: dict[str, str]
) -> grpc.ServerCredentials:
    """gRPC server credentials that pick up changed PEM files at the next handshake."""
    watcher = PemWatcher(paths)

    def config(files: dict[str, bytes]) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(files["key"], files["cert"])], root_certificates=files.get("ca")
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            files = watcher.changed()
        except Exception:  # grpc treats an exception here as a failed handshake
            log.exception("certificate reload failed; keeping the old certificate")
            return None
        return None if files is None else config(files)

    initial = config({"cert": cert, "key": key, **({"ca": ca} if ca is not None else {})})
    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=ca is not None
    )


def watch_ssl_context(context: ssl.SSLContext, paths: dict[str, str]) -> ssl.SSLContext:
    """Make ``context`` (a server's) load changed PEM files at the start of a handshake."""
    watcher = PemWatcher(paths)
    lock = threading.Lock()

    def on_hello(_sock: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        files = watcher.changed()
        if files is None:
            return
        with lock:
            if "cert" in files:
                load_cert_chain(ctx, files["cert"], files["key"])
            if "ca" in files:
                ctx.load_verify_locations(cadata=files["ca"].decode("ascii", "replace"))

    context.sni_callback = _keep_alive(on_hello, watcher)
    return context


def _keep_alive(
    callback: Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None], watcher: PemWatcher
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    """``callback`` holding a strong reference to ``watcher`` (the registry is weak)."""

    def hello(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            callback(sock, name, ctx)
        except Exception:  # an exception here would fail this client's handshake
            log.exception("certificate reload failed; keeping the old certificate")
        _ = watcher

    return hello
