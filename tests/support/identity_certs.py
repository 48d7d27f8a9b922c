"""Certificates that name callers: a CA issuing node, reader and admin certificates on demand.

:class:`IdentityCA` writes PEM files under a directory; each client certificate
carries the identity fields tests choose (URI SAN, DNS SAN, CN), optionally
already expired. ``tls_*`` helpers build the ``tls`` config dicts users write.

    ca = IdentityCA(tmp_path)
    server = Security.from_config(ca.server_tls(identity="san-uri"))
    node_a = Security.from_config(ca.client_tls(ca.client("a", uri="spiffe://t/node-a")))
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Leaf:
    """Paths of one certificate and its key."""

    cert: Path
    key: Path


class IdentityCA:
    """A throw-away CA under ``directory``; :meth:`client` issues certificates naming callers."""

    def __init__(self, directory: Path, name: str = "kvpeer identity CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / f"{_slug(name)}-ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server: Leaf | None = None

    def server(self, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), tag: str = "") -> Leaf:
        """A server certificate for ``hosts`` (a new one per ``tag``)."""
        sans = [_host_name(h) for h in hosts]
        return self._issue(f"server{tag}", "kvpeer-server", sans, server=True)

    def client(
        self,
        file_name: str,
        *,
        uri: str | None = None,
        dns: str | None = None,
        cn: str | None = None,
        expired: bool = False,
    ) -> Leaf:
        """A client certificate with the given identity fields (CN defaults to ``file_name``)."""
        sans: list[x509.GeneralName] = []
        if uri is not None:
            sans.append(x509.UniformResourceIdentifier(uri))
        if dns is not None:
            sans.append(x509.DNSName(dns))
        return self._issue(file_name, cn or file_name, sans, server=False, expired=expired)

    def _issue(
        self,
        file_name: str,
        cn: str,
        sans: list[x509.GeneralName],
        *,
        server: bool,
        expired: bool = False,
    ) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (
            (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
            if expired
            else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        leaf = Leaf(self.directory / f"{file_name}.pem", self.directory / f"{file_name}.key")
        leaf.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return leaf

    def server_tls(
        self, *, identity: str | None = None, identity_map: Path | None = None
    ) -> dict[str, str]:
        """A mutual-TLS server ``tls`` config (with ``tls.identity`` when given)."""
        if self._server is None:
            self._server = self.server()
        config = {"cert": str(self._server.cert), "key": str(self._server.key), "ca": str(self.ca)}
        if identity is not None:
            config["identity"] = identity
        if identity_map is not None:
            config["identity_map"] = str(identity_map)
        return config

    def client_tls(self, leaf: Leaf | None) -> dict[str, str]:
        """A client ``tls`` config trusting this CA, presenting ``leaf`` (None: no certificate)."""
        config = {"ca": str(self.ca)}
        if leaf is not None:
            config |= {"cert": str(leaf.cert), "key": str(leaf.key)}
        return config


def _host_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)
