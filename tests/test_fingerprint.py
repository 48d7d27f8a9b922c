"""The pure Fingerprint type: stable digests, validation of received fingerprints, mismatch text."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpeer.api.errors import WireError
from kvpeer.api.fingerprint import (
    MAX_INGREDIENT_BYTES,
    MAX_INGREDIENTS,
    MISMATCH_HINTS,
    Fingerprint,
    is_digest,
)
from kvpeer.v1 import fingerprint_pb2

BASE = {
    "protocol_version": "1",
    "model": "meta-llama/Meta-Llama-3-8B",
    "dtype": "bfloat16",
    "tokens_per_hash": "16",
    "blocks_per_chunk": "1",
    "chunk_bytes": "2097152",
    "layout": "canonical v1-hnd",
    "parallelism": "agnostic",
    "hash_algo": "sha256",
    "hash_seed": "vllm-none-hash",
}


def test_digest_is_the_documented_sha256_prefix_of_sorted_compact_json():
    # Nodes of different kvpeer builds must agree: the digest is part of the wire
    # protocol. Golden value: sha256('{"dtype":"float16","model":"m","protocol_version":"1"}').
    fp = Fingerprint.of(model="m", dtype="float16", protocol_version=1)
    assert fp.digest == "b20bf9ce2e17e9b95506a91330a90b94"
    assert is_digest(fp.digest)


def test_digest_ignores_ingredient_order_and_value_types():
    a = Fingerprint(BASE)
    b = Fingerprint(dict(reversed(list(BASE.items()))))
    c = Fingerprint.of(**{**BASE, "tokens_per_hash": 16, "protocol_version": 1})
    assert a.digest == b.digest == c.digest


def test_digest_is_the_same_in_another_process_with_another_hash_seed():
    code = f"from kvpeer.api.fingerprint import Fingerprint;print(Fingerprint({BASE!r}).digest)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == Fingerprint(BASE).digest


def test_every_ingredient_changes_the_digest():
    digests = {Fingerprint(BASE).digest}
    for name in BASE:
        digests.add(Fingerprint({**BASE, name: BASE[name] + "x"}).digest)
    assert len(digests) == len(BASE) + 1


def test_fingerprint_is_immutable():
    fp = Fingerprint(BASE)
    with pytest.raises(TypeError):
        fp.ingredients["model"] = "other"  # type: ignore[index]
    source = dict(BASE)
    fp = Fingerprint(source)
    source["model"] = "changed after construction"
    assert fp.ingredients["model"] == BASE["model"]


def test_proto_round_trip_keeps_digest_and_ingredients():
    fp = Fingerprint(BASE)
    wire = fp.to_proto().SerializeToString()
    back = Fingerprint.from_proto(fingerprint_pb2.Fingerprint.FromString(wire))
    assert back == fp
    assert dict(back.ingredients) == BASE


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
        st.text(st.characters(codec="utf-8"), max_size=40),
        max_size=20,
    )
)
def test_proto_round_trip_for_any_ingredients(ingredients):
    fp = Fingerprint(ingredients)
    assert Fingerprint.from_proto(fp.to_proto()) == fp


def test_from_proto_refuses_a_digest_that_does_not_match_the_ingredients():
    msg = Fingerprint(BASE).to_proto()
    msg.ingredients["model"] = "something-else"  # claim the old digest, show other ingredients
    with pytest.raises(WireError, match="does not match its ingredients"):
        Fingerprint.from_proto(msg)


def test_from_proto_refuses_an_empty_digest():
    msg = fingerprint_pb2.Fingerprint(ingredients=BASE)
    with pytest.raises(WireError, match="digest ''"):
        Fingerprint.from_proto(msg)


def test_from_proto_refuses_too_many_ingredients():
    ingredients = {f"k{i}": "v" for i in range(MAX_INGREDIENTS + 1)}
    msg = Fingerprint(ingredients).to_proto()
    with pytest.raises(
        WireError, match=f"{MAX_INGREDIENTS + 1} ingredients, max {MAX_INGREDIENTS}"
    ):
        Fingerprint.from_proto(msg)


def test_from_proto_refuses_oversized_ingredients():
    msg = Fingerprint({"model": "m" * MAX_INGREDIENT_BYTES}).to_proto()
    with pytest.raises(WireError, match=f"max {MAX_INGREDIENT_BYTES}"):
        Fingerprint.from_proto(msg)


def test_mismatch_is_none_for_equal_fingerprints():
    assert Fingerprint(BASE).mismatch(Fingerprint(dict(BASE))) is None


@pytest.mark.parametrize("name", sorted(BASE))
def test_mismatch_names_the_ingredient_both_values_and_the_hint(name):
    ours, theirs = Fingerprint(BASE), Fingerprint({**BASE, name: "other-value"})
    message = ours.mismatch(theirs)
    assert message == (
        f"{name.replace('_', ' ')} differs (ours {BASE[name]}, theirs other-value): "
        f"{MISMATCH_HINTS[name]}"
    )


def test_mismatch_lists_every_differing_ingredient_and_nothing_else():
    theirs = Fingerprint({**BASE, "parallelism": "tp=2 pp=1 pcp=1 dcp=1", "hash_seed": "x"})
    message = Fingerprint(BASE).mismatch(theirs)
    assert message is not None
    parts = message.split("; ")
    assert [p.split(" differs")[0] for p in parts] == ["hash seed", "parallelism"]
    assert "set the same PYTHONHASHSEED on all nodes" in parts[0]
    assert "TP differs and canonical_layout is off" in parts[1]


def test_mismatch_reports_ingredients_only_one_side_has():
    ours = Fingerprint(BASE)
    theirs = Fingerprint({**BASE, "future_knob": "on"})
    assert ours.mismatch(theirs) == (
        "future knob differs (ours <absent>, theirs on): the nodes are configured differently"
    )


def test_describe_shows_the_digest_and_one_line_per_ingredient_sorted():
    lines = Fingerprint(BASE).describe().splitlines()
    assert lines[0] == f"fingerprint {Fingerprint(BASE).digest}"
    names = [line.split()[0] for line in lines[1:]]
    assert names == sorted(BASE)
    assert "  model             meta-llama/Meta-Llama-3-8B" in lines


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0123456789abcdef0123456789abcdef", True),
        ("0123456789ABCDEF0123456789ABCDEF", False),
        ("0123456789abcdef0123456789abcde", False),
        ("0123456789abcdef0123456789abcdef0", False),
        ("", False),
        ("g123456789abcdef0123456789abcdef", False),
    ],
)
def test_is_digest(text, ok):
    assert is_digest(text) is ok
