"""Client credential flags (``--tls-*``, ``--auth-token-file``) shared by the commands that dial.

``kvpeer inspect`` presents them to nodes and the directory, ``kvpeer proxy`` to the
directory it asks for prefix routing. :data:`FLAGS` maps the config keys that
:class:`~kvpeer.api.security.Security` names in its errors back to these flags.
"""

from __future__ import annotations

import argparse

from kvpeer.api.security import Security

#: Config key in a ConfigError -> the flag a user typed.
FLAGS = {
    "tls.cert": "--tls-cert",
    "tls.key": "--tls-key",
    "tls.ca": "--tls-ca",
    "tls.server_name": "--tls-server-name",
    "auth_token_file": "--auth-token-file",
}


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, whom: str) -> None:
    """Add the flags; ``whom`` names the servers they are presented to (for --help)."""
    parser.add_argument("--tls-cert", metavar="PEM", help=f"client certificate for {whom}")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-ca", metavar="PEM", help=f"CA that signs the certificates of {whom}")
    parser.add_argument(
        "--tls-server-name", metavar="NAME", help="name to verify in server certificates"
    )
    parser.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help=f"bearer token for {whom} (a read-only token will do for reads)",
    )


def security(args: argparse.Namespace) -> Security:
    """The Security the flags describe; ConfigError names a config key (see :data:`FLAGS`)."""
    tls = {
        name: value
        for name, value in (
            ("cert", args.tls_cert),
            ("key", args.tls_key),
            ("ca", args.tls_ca),
            ("server_name", args.tls_server_name),
        )
        if value is not None
    }
    return Security.from_config(tls or None, args.auth_token_file)
