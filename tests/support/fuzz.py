"""Hostile-input kit for the ``tests/test_fuzz_*.py`` modules: adversarial messages, mutations, raw calls.

Everything works on serialized bytes, so a test sends anything — valid, mutated or
random — on a method through a channel with no serializer, as a hostile client
would. Three input classes, each a hypothesis strategy of :class:`FuzzInput`
(:func:`fuzz_inputs` mixes them):

- ``structured``: a request message built field by field from adversarial values
  (:func:`message_strategy`): empty, huge and control-character strings, keys of 0
  to 200 bytes, edge integers (0, 2**32-1, 2**64-1), repeated fields up to and
  past the server's request limit, plausible values a test supplies as hints
  (real node ids, epochs, lease ids, keys);
- ``mutated``: a structured message's bytes after 1 to 4 :func:`mutations`: bit
  flips, truncation, insertions, deletions, extra fields of any number and wire
  type (so known fields arrive with the wrong wire type), length prefixes that
  claim more than is there, over-long varints, deeply nested garbage, repetition;
- ``random``: random bytes, short or around :data:`MAX_REQUEST_BYTES`.

:class:`Tally` counts inputs and statuses per method for the report that
``KVPEER_FUZZ_REPORT`` names (a JSON file); ``KVPEER_FUZZ_EXAMPLES`` (default
200) scales every run. The fuzz modules share one :data:`TALLY`, reported once
per session by the :func:`fuzz_report` fixture (each module has
``pytestmark = pytest.mark.usefixtures("fuzz_report")``; ``tests/conftest.py``
registers this module as a plugin), and the checks of a service model
(:func:`request_or_refusal`, :func:`expect`, :func:`single_response`,
:func:`fuzz_method`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from kvpeer.api.fingerprint import MAX_INGREDIENT_BYTES, MAX_INGREDIENTS, Fingerprint
from kvpeer.api.limits import MAX_REQUEST_BYTES
from kvpeer.api.wire import varint
from kvpeer.v1 import fingerprint_pb2

#: Examples per fuzzed method in the default (CI) run; KVPEER_FUZZ_EXAMPLES overrides it.
EXAMPLES = int(os.environ.get("KVPEER_FUZZ_EXAMPLES", "200"))
#: Where to write the per-method counts as JSON (unset: print them only).
REPORT_PATH = os.environ.get("KVPEER_FUZZ_REPORT")
#: Deadline of every fuzz call: generous for a loaded 2-core machine. A call that
#: reaches it counts as a hang.
CALL_TIMEOUT_S = 30.0

U32_EDGES = (0, 1, 0x7F, 0x80, 2**31 - 1, 2**31, 2**32 - 1)
U64_EDGES = (0, 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
#: Request sizes around the server's limit (a request above it is RESOURCE_EXHAUSTED).
LIMIT_SIZES = (
    MAX_REQUEST_BYTES - 1,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_BYTES + 1,
    4 * MAX_REQUEST_BYTES,
)


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for a fuzz test: no deadline, no database, no health checks."""
    return settings(
        max_examples=max(1, examples),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@dataclass(frozen=True)
class FuzzInput:
    """One request body and the class of input it came from."""

    kind: str
    body: bytes

    def __repr__(self) -> str:  # failing examples are printed: keep megabytes out
        head = self.body[:96].hex() + ("..." if len(self.body) > 96 else "")
        return f"FuzzInput({self.kind}, {len(self.body)} bytes, {head})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' printer
        printer.text(repr(self))


# -- wire encoding (varint: kvpeer.api.wire) ----------------------------------------------


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def uniform_bytes(seed: int, size: int) -> bytes:
    """``size`` uniformly random bytes (hypothesis' own bytes favour zeros and small sizes)."""
    return random.Random(seed).randbytes(size)


# -- adversarial field values --------------------------------------------------------

_LONG_TEXT_UNITS = ("x", "\u00e9", "\u4e2d", "\U0001f600", "\x00", " ")


def adversarial_text() -> SearchStrategy[str]:
    """Strings a hostile client may send: empty, unicode, control characters, huge."""
    return st.one_of(
        st.just(""),
        st.text(max_size=40),
        st.sampled_from(
            [
                "\x00",
                "a b",
                "n0\n",
                " n0",
                "n0\t",
                "\u200b",
                "\u00a0",
                "\u3000",
                "\x1b[31m",
                "../../etc/passwd",
                "%s%n",
                "0" * 31,
                "0" * 33,
                "0" * 32 + "\n",
                "A" * 32,
                "h:\u00b2",
                "h:\u0661\u0662",
                "[a b]:1",
                "[::1]:7601",
                "[]:1",
                "abc\n:80",
                "0.0.0.0:7601",
                "host:0",
                "host:65536",
                "host:99999999999999999999",
            ]
        ),
        st.tuples(st.sampled_from(_LONG_TEXT_UNITS), st.sampled_from([128, 129, 4097, 70000])).map(
            lambda t: t[0] * t[1]
        ),
    )


def adversarial_key() -> SearchStrategy[bytes]:
    """Chunk keys of 0 to 200 bytes, edge sizes around the 64-byte limit included."""
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, 2**32), st.sampled_from([0, 1, 20, 36, 63, 64, 65, 200])).map(
            lambda t: uniform_bytes(*t)
        ),
    )


def _distinct_keys(count: int, size: int) -> list[bytes]:
    return [(i.to_bytes(4, "big") * (size // 4 + 1))[:size] for i in range(count)]


def huge_keys() -> SearchStrategy[list[bytes]]:
    """Repeated key fields at and past the 4,096-key and 1 MiB request limits."""
    return st.tuples(
        st.sampled_from([4096, 4097, 26000, 30000]), st.sampled_from([1, 36, 64, 65])
    ).map(lambda t: _distinct_keys(*t))


def huge_u32s() -> SearchStrategy[list[int]]:
    """Repeated uint32 fields (Pull indices) of thousands to ~1 MiB of packed varints."""
    return st.tuples(st.sampled_from([4096, 300_000]), st.sampled_from([1, 8, 2**32 - 1])).map(
        lambda t: [i % t[1] if t[1] < 2**32 - 1 else t[1] for i in range(t[0])]
    )


def uint(bits: int) -> SearchStrategy[int]:
    edges = U32_EDGES if bits == 32 else U64_EDGES
    return st.one_of(st.sampled_from(edges), st.integers(0, 2**bits - 1))


def fingerprint_protos(good: Sequence[Fingerprint]) -> SearchStrategy[fingerprint_pb2.Fingerprint]:
    """Fingerprint messages: good ones, forged digests, other ingredients, oversized maps."""
    text = adversarial_text()

    def forged(pair: tuple[Fingerprint, str]) -> fingerprint_pb2.Fingerprint:
        message = pair[0].to_proto()
        message.digest = pair[1]
        return message

    def changed(pair: tuple[Fingerprint, tuple[str, str]]) -> fingerprint_pb2.Fingerprint:
        fp, (name, value) = pair
        return Fingerprint({**fp.ingredients, name: value}).to_proto()

    def oversized(which: int) -> fingerprint_pb2.Fingerprint:
        if which == 0:
            ingredients = {f"i{n}": "v" for n in range(MAX_INGREDIENTS + 1)}
        else:
            ingredients = {"model": "m" * (MAX_INGREDIENT_BYTES + 1)}
        return Fingerprint(ingredients).to_proto()

    return st.one_of(
        st.sampled_from(list(good)).map(Fingerprint.to_proto),
        st.tuples(st.sampled_from(list(good)), text).map(forged),
        st.tuples(st.sampled_from(list(good)), st.tuples(text, text)).map(changed),
        st.dictionaries(text, text, max_size=4).map(lambda d: Fingerprint(d).to_proto()),
        st.tuples(st.dictionaries(text, text, max_size=4), text).map(
            lambda t: fingerprint_pb2.Fingerprint(ingredients=t[0], digest=t[1])
        ),
        st.integers(0, 1).map(oversized),
    )


#: A hint: a strategy of plausible values for a field. To offer state the test
#: learns as it goes (epochs, lease ids), map a fixed-range draw onto it, e.g.
#: ``st.integers(0, 255).map(lambda i: pool[i % len(pool)])``: hypothesis needs the
#: same draws to replay an example, whatever the state.
Hint = SearchStrategy[Any]


def from_pool(pool: Callable[[], Sequence[Any]], fallback: Any) -> SearchStrategy[Any]:
    """An element of ``pool()`` as it is when drawn (``fallback`` while it is empty)."""

    def pick(i: int) -> Any:
        items = pool()
        return items[i % len(items)] if items else fallback

    return st.integers(0, 255).map(pick)


def _adversarial_values(
    field: FieldDescriptor,
    fingerprints: Sequence[Fingerprint],
    hints: Mapping[str, Hint] | None = None,
) -> SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "kvpeer.v1.Fingerprint":
            element: SearchStrategy[Any] = fingerprint_protos(fingerprints)
        else:  # another nested message (Host, Region, MappedRow): its fields, recursively
            from google.protobuf.message_factory import GetMessageClass

            nested = GetMessageClass(field.message_type)
            element = st.deferred(
                lambda: message_strategy(nested, hints=hints, fingerprints=fingerprints)
            )
    elif field.type == FieldDescriptor.TYPE_STRING:
        element = adversarial_text()
    elif field.type == FieldDescriptor.TYPE_BYTES:
        element = adversarial_key()
    elif field.type == FieldDescriptor.TYPE_UINT32:
        element = uint(32)
    elif field.type == FieldDescriptor.TYPE_UINT64:
        element = uint(64)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        element = st.booleans()
    else:  # a new field type needs a strategy here
        raise AssertionError(f"no adversarial values for {field.full_name}")
    if not field.is_repeated:
        return element
    huge = huge_keys() if field.type == FieldDescriptor.TYPE_BYTES else huge_u32s()
    return st.one_of(st.lists(element, max_size=8), huge)


def message_strategy(
    cls: type[Message],
    *,
    hints: Mapping[str, Hint] | None = None,
    fingerprints: Sequence[Fingerprint] = (),
) -> SearchStrategy[Message]:
    """Messages of ``cls`` whose fields are absent, plausible (``hints``) or adversarial.

    Each field is unset one time in ten; a hinted field takes a hinted value seven
    times in ten, an adversarial one otherwise. ``hints`` maps a field name to a
    :data:`Hint`; for repeated fields the hint yields whole lists. ``fingerprints``
    are the good fingerprints that forged and altered ones start from.
    """
    hints = hints or {}
    good = fingerprints or [Fingerprint.of(model="m")]
    fields = [
        (field.name, hints.get(field.name), _adversarial_values(field, good, hints))
        for field in cls.DESCRIPTOR.fields
    ]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for name, hint, adversarial in fields:
            choice = draw(st.integers(0, 9))
            if choice == 9:
                continue  # leave it unset
            value = draw(hint if hint is not None and choice < 7 else adversarial)
            if isinstance(value, Message):
                getattr(message, name).CopyFrom(value)
            elif isinstance(value, list):
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        return message

    return build()


# -- mutations -------------------------------------------------------------------------

_FIELD_NUMBERS = st.one_of(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 15, 16, 2047, 2**29 - 1]), st.integers(1, 2**29 - 1)
)


def _field_payload(wire_type: int, value: int, blob: bytes) -> bytes:
    if wire_type == 0:
        return varint(value)
    if wire_type == 1:
        return blob[:8].ljust(8, b"\0")
    if wire_type == 2:
        return varint(len(blob)) + blob
    if wire_type == 5:
        return blob[:4].ljust(4, b"\0")
    return blob  # 3, 4: group markers; 6, 7: invalid wire types, junk after


def mutations() -> SearchStrategy[list[tuple[Any, ...]]]:
    """1 to 4 byte-level mutation operations for :func:`mutate`."""
    pos = st.integers(0, 2**20)
    blob = st.binary(max_size=24)
    ops = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
        st.tuples(
            st.just("field"),
            pos,
            _FIELD_NUMBERS,
            st.integers(0, 7),
            st.one_of(st.sampled_from([0, 2**32, 2**64 - 1, 2**70]), st.integers(0, 2**64)),
            blob,
        ),
        st.tuples(
            st.just("lie"),
            pos,
            _FIELD_NUMBERS,
            st.sampled_from([1, 100, MAX_REQUEST_BYTES, 2**31, 2**63, 2**64 - 1]),
            blob,
        ),
        st.tuples(st.just("overlong"), pos, st.integers(10, 12)),
        st.tuples(st.just("nest"), pos, _FIELD_NUMBERS, st.integers(1, 200), st.booleans(), blob),
        st.tuples(st.just("repeat"), st.integers(2, 4)),
    )
    return st.lists(ops, min_size=1, max_size=4)


def mutate(data: bytes, ops: Sequence[tuple[Any, ...]]) -> bytes:
    """Apply :func:`mutations` ops to ``data`` in order; positions wrap around its length."""
    out = bytearray(data)
    for op in ops:
        name = op[0]
        at = op[1] % (len(out) + 1) if name != "repeat" else 0
        if name == "flip":
            if out:
                out[at % len(out)] ^= 1 << op[2]
        elif name == "truncate":
            del out[at:]
        elif name == "insert":
            out[at:at] = op[2]
        elif name == "delete":
            del out[at : at + op[2]]
        elif name == "field":
            _, _, field, wire_type, value, payload = op
            out[at:at] = tag(field, wire_type) + _field_payload(wire_type, value, payload)
        elif name == "lie":
            _, _, field, extra, payload = op
            out[at:at] = tag(field, 2) + varint(len(payload) + extra) + payload
        elif name == "overlong":
            out[at:at] = b"\xff" * op[2] + b"\x01"
        elif name == "nest":
            _, _, field, depth, group, payload = op
            if group:
                nested = tag(field, 3) * depth + payload + tag(field, 4) * depth
            else:
                nested = payload
                for _ in range(depth):
                    nested = tag(field, 2) + varint(len(nested)) + nested
            out[at:at] = nested
        elif name == "repeat":
            out = out * op[1]
    return bytes(out)


def random_bodies(*, around_limit: bool = True) -> SearchStrategy[bytes]:
    """Random bodies: hypothesis' bytes, uniform bytes and (``around_limit``) sizes near the limit."""
    seed = st.integers(0, 2**32)
    small = st.one_of(
        st.binary(max_size=512),
        st.tuples(seed, st.integers(0, 4096)).map(lambda t: uniform_bytes(*t)),
    )
    if not around_limit:
        return small
    return st.one_of(
        small, st.tuples(seed, st.sampled_from(LIMIT_SIZES)).map(lambda t: uniform_bytes(*t))
    )


def fuzz_inputs(structured: SearchStrategy[Message]) -> SearchStrategy[FuzzInput]:
    """Inputs of the three classes: structured and mutated 2 in 5 each, random 1 in 5."""
    serialized = structured.map(lambda m: m.SerializeToString())
    plain = serialized.map(lambda b: FuzzInput("structured", b))
    mutated = st.tuples(serialized, mutations()).map(lambda t: FuzzInput("mutated", mutate(*t)))
    return st.one_of(
        plain, mutated, plain, mutated, random_bodies().map(lambda b: FuzzInput("random", b))
    )


# -- raw calls ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one raw call ended: status, details, the response messages received, time."""

    code: grpc.StatusCode
    details: str
    messages: list[bytes]
    seconds: float


def call_raw(
    channel: grpc.Channel, path: str, body: bytes, *, stream: bool, timeout: float = CALL_TIMEOUT_S
) -> Outcome:
    """Send ``body`` as the request of method ``path`` (``/pkg.Service/Method``), raw bytes.

    For a server stream, reads every message until the status arrives.
    """
    started = time.monotonic()
    messages: list[bytes] = []
    try:
        if stream:
            call = channel.unary_stream(path)(body, timeout=timeout)
            for message in call:
                messages.append(message)
        else:
            response, call = channel.unary_unary(path).with_call(body, timeout=timeout)
            messages.append(response)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    return Outcome(code, details, messages, time.monotonic() - started)


#: Codes that mean the server failed, not that it judged the request.
SERVER_FAILURES = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
)


def check_outcome(
    outcome: Outcome, allowed: frozenset[grpc.StatusCode], what: str, fuzz: FuzzInput
) -> None:
    """Fail unless ``outcome`` is OK or an ``allowed`` code with a non-empty message."""
    context = f"{what}: {outcome.code.name} {outcome.details[:300]!r} for {fuzz!r}"
    assert outcome.code not in SERVER_FAILURES, f"server failure: {context}"
    assert outcome.code == grpc.StatusCode.OK or outcome.code in allowed, (
        f"unexpected status: {context}"
    )
    if outcome.code != grpc.StatusCode.OK:
        assert outcome.details.strip(), f"refusal without a message: {context}"


# -- counting and memory ---------------------------------------------------------------


class Tally:
    """Inputs tried and statuses seen, per fuzz target; thread-safe; written as JSON."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, Counter[str]] = defaultdict(Counter)
        self._codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.notes: dict[str, Any] = {}

    def record(self, target: str, kind: str, outcome: str) -> None:
        with self._lock:
            self._kinds[target][kind] += 1
            self._codes[target][outcome] += 1

    def summary(self) -> dict[str, Any]:
        with self._lock:
            targets = {
                target: {
                    "inputs": sum(kinds.values()),
                    "by_class": dict(sorted(kinds.items())),
                    "outcomes": dict(sorted(self._codes[target].items())),
                }
                for target, kinds in sorted(self._kinds.items())
            }
            total = sum(t["inputs"] for t in targets.values())
            return {"examples_setting": EXAMPLES, "total_inputs": total, "targets": targets} | {
                "notes": dict(self.notes)
            }

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.summary(), indent=2, sort_keys=False) + "\n")

    def lines(self) -> list[str]:
        summary = self.summary()
        out = [f"fuzz: {summary['total_inputs']} inputs (KVPEER_FUZZ_EXAMPLES={EXAMPLES})"]
        for target, entry in summary["targets"].items():
            outcomes = ", ".join(f"{k} {v}" for k, v in entry["outcomes"].items())
            out.append(f"  {target}: {entry['inputs']} ({outcomes})")
        out += [f"  {name}: {value}" for name, value in summary["notes"].items()]
        return out


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- shared by the fuzz modules ---------------------------------------------------------

Code = grpc.StatusCode
#: Inputs and statuses of every fuzz module in this session (one report).
TALLY = Tally()
#: Options of the fuzzing clients' channels: no limit on what the servers answer.
UNLIMITED = [("grpc.max_receive_message_length", -1)]
#: Memory a server process may gain over a fuzz run before it counts as a leak.
RSS_GROWTH_LIMIT = 64 << 20
#: Inputs per method before the first RSS reading (allocator and caches settle), and after.
WARM_UP_EXAMPLES = max(1, EXAMPLES // 8)
RSS_EXAMPLES = max(1, EXAMPLES // 2)


@pytest.fixture(scope="session")
def fuzz_report(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Prints the inputs tried per method at the session's end, and writes KVPEER_FUZZ_REPORT.

    Each fuzz module uses it: ``pytestmark = pytest.mark.usefixtures("fuzz_report")``.
    """
    yield TALLY
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(TALLY.lines()))
    if REPORT_PATH:
        TALLY.write(REPORT_PATH)


def request_or_refusal(cls: type[Message], fuzz: FuzzInput, outcome: Outcome) -> Message | None:
    """The request as the server parsed it; None after checking the status of one it could not.

    Bodies above the request limit must end RESOURCE_EXHAUSTED (gRPC's own check),
    bodies that do not parse INVALID_ARGUMENT naming the message.
    """
    if len(fuzz.body) > MAX_REQUEST_BYTES:
        assert outcome.code == Code.RESOURCE_EXHAUSTED, (outcome.code, outcome.details)
        return None
    try:
        return cls.FromString(fuzz.body)
    except DecodeError:
        assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)
        assert "malformed" in outcome.details, outcome.details
        return None


def expect(outcome: Outcome, code: Code, fuzz: FuzzInput) -> None:
    assert outcome.code == code, (
        f"expected {code.name}, got {outcome.code.name} {outcome.details[:300]!r} for {fuzz!r}"
    )


def single_response(cls: type[Message], outcome: Outcome) -> Message:
    (raw,) = outcome.messages
    return cls.FromString(raw)


class ServiceModel(Protocol):
    """A fuzz module's model of a service: the inputs of a method, and the check of each answer."""

    def inputs(self, method: str) -> SearchStrategy[FuzzInput]: ...

    def send(self, method: str, fuzz: FuzzInput, target: str) -> None: ...


def fuzz_method(model: ServiceModel, method: str, target: str, examples: int) -> None:
    """Send ``examples`` hypothesis-drawn inputs on ``method`` through ``model``'s checks."""

    @fuzz_settings(examples)
    @given(model.inputs(method))
    def run(fuzz: FuzzInput) -> None:
        model.send(method, fuzz, target)

    run()


def record_rss(what: str, before: int, after: int) -> None:
    """Note a server process's RSS before and after a run in the report."""
    TALLY.notes[f"{what} RSS MiB before -> after"] = f"{before / 2**20:.1f} -> {after / 2**20:.1f}"
