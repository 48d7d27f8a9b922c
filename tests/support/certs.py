"""Throw-away TLS material for tests: a CA, a server and a client certificate, and a rogue CA.

``make_certs(tmp_path)`` writes PEM files and returns their paths; the ``tls_*``
helpers turn them into the ``tls`` config dicts that
:meth:`kvpeer.api.security.Security.from_config` reads, so tests configure TLS exactly
as users do. The server certificate names ``localhost`` and ``127.0.0.1``.

    certs = make_certs(tmp_path)
    server = Security.from_config(tls_server(certs, mutual=True))
    client = Security.from_config(tls_client(certs))
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
class CertFiles:
    """Paths of the PEM files :func:`make_certs` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: A CA nobody trusts, and a client certificate it signed.
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def make_certs(
    directory: Path, *, server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> CertFiles:
    """Write a CA, server and client certificates (and a rogue CA and client) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _authority("kvpeer test CA")
    rogue_key, rogue_cert = _authority("rogue CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, "kvpeer-server", server_names, server=True)
    client_key, client_cert = _leaf(ca_key, ca_cert, "kvpeer-client", (), server=False)
    rogue_client_key, rogue_client_cert = _leaf(rogue_key, rogue_cert, "intruder", (), server=False)

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path

    return CertFiles(
        ca=write("ca.pem", _pem(ca_cert)),
        server_cert=write("server.pem", _pem(server_cert)),
        server_key=write("server.key", _key_pem(server_key)),
        client_cert=write("client.pem", _pem(client_cert)),
        client_key=write("client.key", _key_pem(client_key)),
        rogue_ca=write("rogue-ca.pem", _pem(rogue_cert)),
        rogue_client_cert=write("rogue-client.pem", _pem(rogue_client_cert)),
        rogue_client_key=write("rogue-client.key", _key_pem(rogue_client_key)),
    )


def tls_server(certs: CertFiles, *, mutual: bool = False) -> dict[str, str]:
    """A server's ``tls`` config; ``mutual`` requires client certificates from the CA."""
    config = {"cert": str(certs.server_cert), "key": str(certs.server_key)}
    if mutual:
        config["ca"] = str(certs.ca)
    return config


def tls_client(certs: CertFiles, *, with_cert: bool = True, rogue: bool = False) -> dict[str, str]:
    """A client's ``tls`` config trusting the CA; with a client certificate unless told not."""
    config = {"ca": str(certs.ca)}
    if rogue:
        config |= {"cert": str(certs.rogue_client_cert), "key": str(certs.rogue_client_key)}
    elif with_cert:
        config |= {"cert": str(certs.client_cert), "key": str(certs.client_key)}
    return config


def _authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    alt_names: tuple[str, ...],
    *,
    server: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _builder(subject, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in alt_names]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
