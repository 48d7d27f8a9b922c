"""Hostile input on the ``Directory`` service: every method, both stores, its regressions, memory.

Each test sends structured-but-adversarial, mutated and random request bodies
(:mod:`tests.support.fuzz`) as raw bytes on one method of a real directory on
loopback (memory store, then Redis), and checks every answer against
:class:`DirectoryModel`, a model of what the directory must say:
RESOURCE_EXHAUSTED above the request limit, INVALID_ARGUMENT for bytes that do
not parse, then the method's own rules (node ids, endpoints, epochs, keys,
digests), and for OK answers the content (holders, listings). Never UNKNOWN or
INTERNAL, never a refusal without a message, never a hang (every call has a
deadline). Afterwards the directory still serves correctly. A slow test runs
every method against a ``kvpeer directory`` process and bounds the growth of
its memory.

``KVPEER_FUZZ_EXAMPLES`` and ``KVPEER_FUZZ_REPORT``: see :mod:`tests.support.fuzz`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import strategies as st

from kvpeer.api.endpoint import parse_endpoint
from kvpeer.api.limits import MAX_KEY_BYTES, MAX_STATUS_DETAILS_BYTES
from kvpeer.sim.directory import DirectoryProcess
from kvpeer.v1 import directory_pb2 as dpb
from tests.support.directory import FP_A, FP_B, DirectoryHarness
from tests.support.directory import keys as directory_keys
from tests.support.fuzz import (
    EXAMPLES,
    RSS_EXAMPLES,
    RSS_GROWTH_LIMIT,
    TALLY,
    UNLIMITED,
    WARM_UP_EXAMPLES,
    FuzzInput,
    Hint,
    Outcome,
    call_raw,
    check_outcome,
    expect,
    from_pool,
    fuzz_inputs,
    fuzz_method,
    message_strategy,
    record_rss,
    request_or_refusal,
    rss_bytes,
    single_response,
)
from tests.support.redis_server import RedisServer

Code = grpc.StatusCode
pytestmark = pytest.mark.usefixtures("fuzz_report")


# == Directory ==============================================================================

DIRECTORY_METHODS = {
    method.name: getattr(dpb, method.input_type.name)
    for method in dpb.DESCRIPTOR.services_by_name["Directory"].methods
}
DIRECTORY_LEASE_TTL_S = 600.0
NODE_IDS = ["n0", "n1", "n2", "n3"]
#: Registrations a fuzz run keeps at most (it makes the oldest leave beyond).
MAX_FUZZ_NODES = 12
GOOD_ENDPOINTS = ["n0.test:7601", "10.0.0.1:7601", "[::1]:7601", "[fe80::1%eth0]:7601"]
DIRECTORY_KEYS = directory_keys(24)
_DIGEST = re.compile(r"[0-9a-f]{32}")
#: What peers can dial: a host name, IPv4 or bracketed IPv6 address, and a port.
_DIALABLE = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9\-._]*|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9\-._]+)?\]):\d{1,5}"
)
_REQUEST_CODES = frozenset({Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED})
_NODE_CODES = _REQUEST_CODES | {Code.NOT_FOUND, Code.FAILED_PRECONDITION}
#: Refusals each directory method documents (proto/kvpeer/v1/directory.proto).
DIRECTORY_ALLOWED = {
    "Join": _REQUEST_CODES,
    "Heartbeat": _NODE_CODES,
    "Publish": _NODE_CODES,
    "Withdraw": _NODE_CODES,
    "Locate": _REQUEST_CODES,
    "Leave": _NODE_CODES,
    "ListNodes": _REQUEST_CODES,
    "Stats": _REQUEST_CODES,
    "Score": _REQUEST_CODES,
}


@dataclass
class Registration:
    epoch: int
    endpoint: str
    fingerprint: str
    keys: set[bytes] = field(default_factory=set)


def _valid_node_id(node_id: str) -> bool:
    return 1 <= len(node_id) <= 128 and node_id.isprintable() and " " not in node_id


def _batch_code(keys: Sequence[bytes]) -> Code | None:
    if len(keys) > 4096:
        return Code.RESOURCE_EXHAUSTED
    if not keys or not all(0 < len(k) <= MAX_KEY_BYTES for k in keys):
        return Code.INVALID_ARGUMENT
    return None


class DirectoryModel:
    """What a fuzzed directory must answer: live registrations and their keys.

    Leases are long (600 s) and calls sequential, so nothing changes behind the
    model's back: a node is registered from its OK Join until its OK Leave or
    next Join.
    """

    def __init__(self, channel: grpc.Channel, ttl_s: float) -> None:
        self.channel = channel
        self.ttl_ms = round(ttl_s * 1000)
        self.nodes: dict[str, Registration] = {}
        self.epochs: list[int] = []  # every epoch handed out, in order

    def hints(self, method: str) -> dict[str, Hint]:
        def epochs() -> list[int]:
            return [reg.epoch for reg in self.nodes.values()] + self.epochs[-8:]

        fingerprints = (
            [FP_A.to_proto(), FP_B.to_proto()] if method == "Join" else [FP_A.digest, FP_B.digest]
        )
        return {
            "node_id": st.sampled_from(NODE_IDS),
            "epoch": from_pool(epochs, 1),
            "endpoint": st.sampled_from(GOOD_ENDPOINTS),
            "keys": st.lists(st.sampled_from(DIRECTORY_KEYS), min_size=1, max_size=30),
            "exclude_node_id": st.sampled_from(["", *NODE_IDS]),
            "fingerprint": st.sampled_from(fingerprints),
        }

    def well_formed(self, method: str) -> st.SearchStrategy[Message]:
        """Requests that should succeed: joins, and calls naming a registered (node, epoch)."""
        cls = DIRECTORY_METHODS[method]
        keys = st.lists(st.sampled_from(DIRECTORY_KEYS), min_size=1, max_size=30)
        if method == "Join":
            return st.builds(
                dpb.JoinRequest,
                node_id=st.sampled_from(NODE_IDS),
                endpoint=st.sampled_from(GOOD_ENDPOINTS),
                fingerprint=st.sampled_from([FP_A.to_proto(), FP_B.to_proto()]),
            )
        if method in ("Locate", "ListNodes", "Score"):
            digests = st.sampled_from([FP_A.digest, FP_B.digest])
            if method == "ListNodes":
                return st.builds(dpb.ListNodesRequest, fingerprint=st.one_of(st.just(""), digests))
            if method == "Score":
                held = from_pool(
                    lambda: [sorted(r.keys) for r in self.nodes.values() if r.keys],
                    DIRECTORY_KEYS[:4],
                )  # a node's keys in some order, then others: prefixes of every length
                prefixes = held.flatmap(
                    lambda ks: st.permutations(ks).map(lambda p: p + DIRECTORY_KEYS[:3])
                )
                return st.builds(
                    dpb.ScoreRequest,
                    fingerprint=st.one_of(st.just(""), digests),
                    keys=st.one_of(keys, prefixes),
                )
            return st.builds(dpb.LocateRequest, fingerprint=digests, keys=keys)
        if method == "Stats":
            return st.just(dpb.StatsRequest())
        registered = from_pool(lambda: [(n, r.epoch) for n, r in self.nodes.items()], ("n0", 1))

        def build(pair: tuple[tuple[str, int], list[bytes]]) -> Message:
            (node_id, epoch), batch = pair
            fields = {"node_id": node_id, "epoch": epoch}
            return (
                cls(**fields, keys=batch)
                if "keys" in cls.DESCRIPTOR.fields_by_name
                else cls(**fields)
            )

        return st.tuples(registered, keys).map(build)

    def inputs(self, method: str) -> st.SearchStrategy[FuzzInput]:
        adversarial = message_strategy(
            DIRECTORY_METHODS[method], hints=self.hints(method), fingerprints=[FP_A, FP_B]
        )
        return fuzz_inputs(st.one_of(adversarial, self.well_formed(method)))

    def _upkeep(self, method: str, request: Message) -> None:
        """A well-formed call that must succeed; the model follows it."""
        outcome = call_raw(
            self.channel,
            f"/kvpeer.v1.Directory/{method}",
            request.SerializeToString(),
            stream=False,
        )
        assert outcome.code == Code.OK, (method, outcome.code, outcome.details)
        getattr(self, f"_check_{method.lower()}")(request, FuzzInput("upkeep", b""), outcome)

    def keep_nodes_in_range(self) -> None:
        """Two nodes registered at least (one per fingerprint), so that node calls have a
        target; at most :data:`MAX_FUZZ_NODES`, so that the state the fuzz run asks the
        directory to hold stays bounded (a memory check then measures leaks only)."""
        if len(self.nodes) < 2:
            for node_id, fp in (("n0", FP_A), ("n1", FP_B)):
                join = dpb.JoinRequest(
                    node_id=node_id, endpoint=f"{node_id}.test:7601", fingerprint=fp.to_proto()
                )
                self._upkeep("Join", join)
        for node_id in list(self.nodes)[: max(0, len(self.nodes) - MAX_FUZZ_NODES)]:
            leave = dpb.LeaveRequest(node_id=node_id, epoch=self.nodes[node_id].epoch)
            self._upkeep("Leave", leave)

    def send(self, method: str, fuzz: FuzzInput, target: str) -> None:
        self.keep_nodes_in_range()
        outcome = call_raw(self.channel, f"/kvpeer.v1.Directory/{method}", fuzz.body, stream=False)
        TALLY.record(target, fuzz.kind, outcome.code.name)
        check_outcome(outcome, DIRECTORY_ALLOWED[method], target, fuzz)
        request = request_or_refusal(DIRECTORY_METHODS[method], fuzz, outcome)
        if request is not None:
            getattr(self, f"_check_{method.lower()}")(request, fuzz, outcome)

    # -- per method ----------------------------------------------------------------------

    def _state_code(self, node_id: str, epoch: int) -> Code:
        reg = self.nodes.get(node_id)
        if reg is None:
            return Code.NOT_FOUND
        return Code.OK if reg.epoch == epoch else Code.FAILED_PRECONDITION

    def _node_code(self, request: Message, keys: Sequence[bytes] | None = None) -> Code:
        if not _valid_node_id(request.node_id) or request.epoch == 0:
            return Code.INVALID_ARGUMENT
        if keys is not None and (code := _batch_code(keys)) is not None:
            return code
        return self._state_code(request.node_id, request.epoch)

    def _check_join(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        if not _valid_node_id(request.node_id):
            expect(outcome, Code.INVALID_ARGUMENT, fuzz)
        elif request.endpoint in GOOD_ENDPOINTS and request.fingerprint in (
            FP_A.to_proto(),
            FP_B.to_proto(),
        ):
            expect(outcome, Code.OK, fuzz)
        if outcome.code != Code.OK:
            return
        response = single_response(dpb.JoinResponse, outcome)
        assert response.lease_ttl_ms == self.ttl_ms
        assert not self.epochs or response.epoch > self.epochs[-1], "epochs must only grow"
        endpoint = str(parse_endpoint(request.endpoint, key="endpoint"))
        assert _DIALABLE.fullmatch(endpoint), (
            f"accepted an endpoint peers cannot dial: {endpoint!r}"
        )
        self.epochs.append(response.epoch)
        self.nodes[request.node_id] = Registration(
            response.epoch, endpoint, request.fingerprint.digest
        )

    def _check_heartbeat(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request), fuzz)
        if outcome.code == Code.OK:
            assert single_response(dpb.HeartbeatResponse, outcome).lease_ttl_ms == self.ttl_ms

    def _check_publish(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request, request.keys), fuzz)
        if outcome.code == Code.OK:
            assert single_response(dpb.PublishResponse, outcome).accepted == len(request.keys)
            self.nodes[request.node_id].keys.update(request.keys)

    def _check_withdraw(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request, request.keys), fuzz)
        if outcome.code == Code.OK:
            held = self.nodes[request.node_id].keys
            removed = single_response(dpb.WithdrawResponse, outcome).removed
            assert removed == len(held & set(request.keys))
            held.difference_update(request.keys)

    def _check_leave(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, self._node_code(request), fuzz)
        if outcome.code == Code.OK:
            del self.nodes[request.node_id]

    def _check_locate(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        if not _DIGEST.fullmatch(request.fingerprint):
            code = Code.INVALID_ARGUMENT
        else:
            code = _batch_code(request.keys) or Code.OK
        expect(outcome, code, fuzz)
        if code != Code.OK:
            return
        response = single_response(dpb.LocateResponse, outcome)
        assert len(response.holders) == len(request.keys)
        listed = [(n.node_id, n.epoch, n.endpoint) for n in response.nodes]
        for key, holders in zip(request.keys, response.holders, strict=True):
            got = {listed[i] for i in holders.nodes}
            want = {
                (node_id, reg.epoch, reg.endpoint)
                for node_id, reg in self.nodes.items()
                if reg.fingerprint == request.fingerprint
                and key in reg.keys
                and node_id != request.exclude_node_id
            }
            assert got == want, f"holders of {key!r}"

    def _check_listnodes(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        wanted = request.fingerprint
        expect(
            outcome,
            Code.OK if not wanted or _DIGEST.fullmatch(wanted) else Code.INVALID_ARGUMENT,
            fuzz,
        )
        if outcome.code != Code.OK:
            return
        response = single_response(dpb.ListNodesResponse, outcome)
        got = {
            (n.node_id, n.epoch, n.endpoint, n.fingerprint.digest, n.keys) for n in response.nodes
        }
        want = {
            (node_id, reg.epoch, reg.endpoint, reg.fingerprint, len(reg.keys))
            for node_id, reg in self.nodes.items()
            if not wanted or reg.fingerprint == wanted
        }
        assert got == want

    def _check_score(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        wanted = request.fingerprint
        if wanted and not _DIGEST.fullmatch(wanted):
            code = Code.INVALID_ARGUMENT
        elif (batch := _batch_code(request.keys)) is not None:
            code = batch
        elif len({len(k) for k in request.keys}) > 1:
            code = Code.INVALID_ARGUMENT
        else:
            code = Code.OK
        expect(outcome, code, fuzz)
        if code != Code.OK:
            return
        response = single_response(dpb.ScoreResponse, outcome)
        got = [
            (n.node_id, n.epoch, n.endpoint, n.fingerprint, n.prefix_keys) for n in response.nodes
        ]
        want = []
        for node_id, reg in self.nodes.items():
            if wanted and reg.fingerprint != wanted:
                continue
            held = next((i for i, k in enumerate(request.keys) if k not in reg.keys), None)
            prefix = len(request.keys) if held is None else held
            want.append((node_id, reg.epoch, reg.endpoint, reg.fingerprint, prefix))
        assert got == sorted(want, key=lambda n: (-n[4], n[0])), "scores or their order"

    def _check_stats(self, request: Message, fuzz: FuzzInput, outcome: Outcome) -> None:
        expect(outcome, Code.OK, fuzz)
        response = single_response(dpb.StatsResponse, outcome)
        assert response.nodes == len(self.nodes)
        assert response.keys == sum(len(reg.keys) for reg in self.nodes.values())

    def assert_serves_correctly(self) -> None:
        """A well-formed join, publish, locate and leave still work after the fuzz run."""

        def call(method: str, request: Message) -> Outcome:
            body = request.SerializeToString()
            outcome = call_raw(self.channel, f"/kvpeer.v1.Directory/{method}", body, stream=False)
            assert outcome.code == Code.OK, (method, outcome.code, outcome.details)
            return outcome

        join = dpb.JoinRequest(
            node_id="after-fuzz", endpoint="after.test:7601", fingerprint=FP_B.to_proto()
        )
        epoch = single_response(dpb.JoinResponse, call("Join", join)).epoch
        key = b"after-fuzz-key".ljust(36, b"\0")
        call("Publish", dpb.PublishRequest(node_id="after-fuzz", epoch=epoch, keys=[key]))
        located = single_response(
            dpb.LocateResponse,
            call("Locate", dpb.LocateRequest(fingerprint=FP_B.digest, keys=[key])),
        )
        assert [located.nodes[i].node_id for i in located.holders[0].nodes] == ["after-fuzz"]
        call("Leave", dpb.LeaveRequest(node_id="after-fuzz", epoch=epoch))


@dataclass
class DirectoryUnderFuzz:
    kind: str
    model: DirectoryModel


@pytest.fixture(scope="module", params=["memory", "redis"])
def directory(request: pytest.FixtureRequest) -> Iterator[DirectoryUnderFuzz]:
    redis = RedisServer().start() if request.param == "redis" else None
    harness = DirectoryHarness(request.param, redis, lease_ttl_s=DIRECTORY_LEASE_TTL_S)
    try:
        harness.start()
        with grpc.insecure_channel(harness.endpoint, UNLIMITED) as channel:
            yield DirectoryUnderFuzz(request.param, DirectoryModel(channel, DIRECTORY_LEASE_TTL_S))
    finally:
        harness.close()
        if redis is not None:
            redis.close()


@pytest.mark.parametrize("method", list(DIRECTORY_METHODS))
def test_directory_method_answers_hostile_input_meaningfully(
    directory: DirectoryUnderFuzz, method: str
) -> None:
    fuzz_method(directory.model, method, f"Directory[{directory.kind}]/{method}", EXAMPLES)
    directory.model.assert_serves_correctly()


# == Regressions found by the fuzz runs =======================================================


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Join", b"\x0a\x02\xff\xfe"),  # node_id that is not UTF-8
        ("Stats", b"\xff\xff"),  # not a message at all
        ("Locate", b"\x12\x80\x80\x80\x80\x08"),  # length prefix claiming 2 GiB
    ],
)
def test_directory_answers_unparsable_requests_invalid_argument(
    directory: DirectoryUnderFuzz, method: str, body: bytes
) -> None:
    """gRPC's own deserializer answered these INTERNAL "Exception deserializing request!"."""
    outcome = call_raw(
        directory.model.channel, f"/kvpeer.v1.Directory/{method}", body, stream=False
    )
    assert outcome.code == Code.INVALID_ARGUMENT
    assert f"malformed kvpeer.v1.{method}Request" in outcome.details


@pytest.mark.parametrize(
    "endpoint", ["h:\u00b2", "[a b]:7601", "[\x00]:7601", "abc\n:7601", "[::1\n]:7601"]
)
def test_directory_refuses_endpoints_peers_cannot_dial(
    directory: DirectoryUnderFuzz, endpoint: str
) -> None:
    """A superscript port crashed Join (INTERNAL); whitespace in a host broke Redis Locate."""
    join = dpb.JoinRequest(node_id="odd", endpoint=endpoint, fingerprint=FP_A.to_proto())
    outcome = call_raw(
        directory.model.channel, "/kvpeer.v1.Directory/Join", join.SerializeToString(), stream=False
    )
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert "endpoint" in outcome.details


def test_locate_refuses_a_digest_with_a_trailing_newline(directory: DirectoryUnderFuzz) -> None:
    """``is_digest`` matched with ``$``, which also matches before a final newline."""
    locate = dpb.LocateRequest(fingerprint=FP_A.digest + "\n", keys=[b"k"])
    body = locate.SerializeToString()
    outcome = call_raw(directory.model.channel, "/kvpeer.v1.Directory/Locate", body, stream=False)
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert "is not a fingerprint digest" in outcome.details


def test_join_refusal_quoting_a_huge_endpoint_stays_readable(
    directory: DirectoryUnderFuzz,
) -> None:
    """A 200 kB endpoint was quoted twice in the refusal, which no client could receive."""
    join = dpb.JoinRequest(
        node_id="big", endpoint="h" * 200_000 + "!:1", fingerprint=FP_A.to_proto()
    )
    body = join.SerializeToString()
    outcome = call_raw(directory.model.channel, "/kvpeer.v1.Directory/Join", body, stream=False)
    assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details[:200])
    assert outcome.details.startswith("endpoint: invalid host")
    assert outcome.details.endswith("(truncated)")
    assert len(outcome.details.encode()) <= MAX_STATUS_DETAILS_BYTES


# == Memory of a server process under a long run ==============================================


def _directory_rss_run(process: DirectoryProcess, model: DirectoryModel, examples: int) -> None:
    for method in DIRECTORY_METHODS:
        fuzz_method(model, method, f"Directory(process)/{method}", examples)
        assert process.poll() is None, f"the directory process died: {process.stderr()[-2000:]}"


@pytest.mark.slow
def test_directory_process_memory_stays_bounded() -> None:
    """RSS of a ``kvpeer directory`` process (memory store) before and after a run of every method."""
    lease = ["--lease-ttl", str(DIRECTORY_LEASE_TTL_S)]
    with (
        DirectoryProcess(lease, metrics=False) as process,
        grpc.insecure_channel(process.endpoint, UNLIMITED) as channel,
    ):
        model = DirectoryModel(channel, DIRECTORY_LEASE_TTL_S)
        _directory_rss_run(process, model, WARM_UP_EXAMPLES)
        before = rss_bytes(process.pid)
        _directory_rss_run(process, model, RSS_EXAMPLES)
        after = rss_bytes(process.pid)
        model.assert_serves_correctly()
    record_rss("directory process", before, after)
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew from {before} to {after} bytes"
