"""The tier's Publisher: what reaches the directory, including stores made before joining.

vLLM stores can reach the tier before it has joined its directory (it joins once
vLLM has set up its prefix hash, just after building the tier); those keys must
be published when it joins, not dropped. Runs against a real directory server and
a real DirectoryClient.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvpeer.client.directory import DirectoryClient
from kvpeer.tier.publisher import Publisher
from tests.support.directory import FP_A, keys, locate, make_directory  # noqa: F401


def test_keys_stored_before_joining_are_published_on_attach(make_directory):  # noqa: F811
    directory = make_directory("memory")
    publisher = Publisher(reconcile_interval_s=0, batch_keys=64)
    early, late = keys(5, tag="early"), keys(3, tag="late")
    publisher.publish(early)  # no directory yet: recorded, not sent

    client = DirectoryClient(
        directory.endpoint, node_id="n", advertise="n.test:7601", fingerprint=FP_A
    )
    client.start()
    try:
        publisher.attach(client)
        publisher.publish(late)
        assert client.flush(30)
        stub = directory.stub()
        assert all(holders == {("n", client.epoch)} for holders in locate(stub, early + late))

        publisher.withdraw_missing(early[:2])
        assert client.flush(30)
        assert locate(stub, early[:2]) == [set(), set()]
        assert publisher.published_count == 6
    finally:
        client.close()


def test_a_disabled_publisher_records_nothing():
    publisher = Publisher(reconcile_interval_s=0, batch_keys=64)
    publisher.publish(keys(4))
    publisher.disable()
    publisher.publish(keys(4, tag="more"))
    assert publisher.published_count == 0
