"""Hostile input to the identity paths: random certificates fields, tokens and node ids.

Like ``tests/test_fuzz*.py``: a property must hold for every input hypothesis draws.

- :class:`AccessPolicy` maps any auth context / peer certificate / token to a
  principal or refuses with UNAUTHENTICATED, never another exception; a ``node``
  principal is always bound to exactly one node id.
- A real directory with certificate identities, called by node-b with random node
  ids and random bytes on every write method, never accepts a write as another
  node and never answers UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpeer.api.identity import (
    IDENTITY_FIELDS,
    AccessPolicy,
    AccessRefused,
    Role,
    identity_from_auth_context,
    identity_from_peercert,
)
from kvpeer.api.security import Security
from kvpeer.server.directory.authz import WRITE_METHODS
from kvpeer.server.directory.service import DirectoryServer
from kvpeer.v1 import directory_pb2 as pb
from tests.support.directory import FP_A
from tests.support.identity_certs import IdentityCA

text = st.text(max_size=300)
raw = st.binary(max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    rule=st.sampled_from(IDENTITY_FIELDS),
    auth=st.dictionaries(
        st.sampled_from(["peer_uri", "peer_dns", "x509_common_name", "other"]),
        st.lists(raw, max_size=3),
    ),
    token=st.one_of(st.none(), raw),
)
def test_auth_context_maps_or_refuses(rule, auth, token) -> None:
    identity = identity_from_auth_context(auth, rule)
    assert identity is None or (0 < len(identity) <= 256)
    policy = AccessPolicy(identity=rule)
    try:
        principal = policy.resolve(identity, token)
    except AccessRefused as exc:
        assert exc.code == grpc.StatusCode.UNAUTHENTICATED and exc.message
        return
    assert principal.role is Role.NODE and principal.node_id == identity
    assert principal.may_act_as(identity) and not principal.may_act_as(identity + "x")


@settings(max_examples=300, deadline=None)
@given(
    rule=st.sampled_from(IDENTITY_FIELDS),
    cert=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {
                "subject": st.lists(
                    st.lists(st.tuples(st.sampled_from(["commonName", "x"]), text), max_size=2).map(
                        tuple
                    ),
                    max_size=2,
                ).map(tuple),
                "subjectAltName": st.lists(
                    st.tuples(st.sampled_from(["DNS", "URI", "IP Address"]), text), max_size=3
                ).map(tuple),
            }
        ),
    ),
)
def test_peercert_maps_or_refuses(rule, cert) -> None:
    identity = identity_from_peercert(cert, rule)
    try:
        principal = AccessPolicy(identity=rule).principal_of_peercert(cert, None)
    except AccessRefused as exc:
        assert identity is None and exc.code == grpc.StatusCode.UNAUTHENTICATED
        return
    assert principal.node_id == identity


@settings(max_examples=300, deadline=None)
@given(presented=st.one_of(st.none(), raw))
def test_unknown_tokens_are_refused_without_echo(presented) -> None:
    policy = AccessPolicy(tokens=((b"Bearer secret-reader", _reader()),))
    refusal = policy.token_refusal(presented)
    if presented == b"Bearer secret-reader":
        assert refusal is None
    else:
        assert refusal is not None and "secret" not in refusal


def _reader():
    from kvpeer.api.identity import Principal

    return Principal("read-only token", Role.READER)


@pytest.fixture(scope="module")
def identity_directory(tmp_path_factory):
    ca = IdentityCA(tmp_path_factory.mktemp("fuzz-ca"))
    server = DirectoryServer(
        "127.0.0.1:0", security=Security.from_config(ca.server_tls(identity="san-uri"))
    ).start()
    channel = Security.from_config(ca.client_tls(ca.client("node-b", uri="node-b"))).open_channel(
        f"localhost:{server.port}"
    )
    yield channel
    channel.close()
    server.stop(grace=None)


DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(sorted(WRITE_METHODS)),
    node_id=st.one_of(st.just("node-a"), st.just("node-b"), text),
    epoch=st.integers(0, 2**64 - 1),
    garbage=st.one_of(st.none(), raw),
)
def test_writes_as_another_node_are_always_refused(
    identity_directory, method, node_id, epoch, garbage
) -> None:
    request_cls = getattr(pb, f"{method}Request")
    if garbage is not None:
        body = garbage
    elif method == "Join":
        body = pb.JoinRequest(
            node_id=node_id, endpoint="x.test:1", fingerprint=FP_A.to_proto()
        ).SerializeToString()
    else:
        body = request_cls(node_id=node_id, epoch=epoch).SerializeToString()
    call = identity_directory.unary_unary(f"/kvpeer.v1.Directory/{method}")
    try:
        call(body, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert exc.details()
    assert code in DOCUMENTED, code
    if code is grpc.StatusCode.OK:
        parsed = request_cls.FromString(body)
        assert parsed.node_id == "node-b", parsed
