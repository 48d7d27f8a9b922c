"""Shared pieces of the pull tests: both transports, sentinel buffers, pulls on a thread.

Import the fixtures explicitly into a test module (with ``make_client`` from
:mod:`tests.support.peer`, which ``pull_client`` builds on):

    from tests.support.peer import make_client_fixture  # noqa: F401
    from tests.support.pull import pull_client_fixture, transport_fixture  # noqa: F401

A test that takes ``pull_client`` runs once per pull transport (``h2``, ``grpc``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from kvpeer.client.peer import PULL_TRANSPORTS, PeerClient

#: What unwritten rows hold, so a test sees which rows a pull touched.
SENTINEL = 0xA5


@pytest.fixture(name="transport", params=PULL_TRANSPORTS)
def transport_fixture(request: pytest.FixtureRequest) -> str:
    """Each pull transport in turn."""
    return request.param


@pytest.fixture(name="pull_client")
def pull_client_fixture(
    make_client: Callable[..., PeerClient], transport: str
) -> Callable[..., PeerClient]:
    """``pull_client(endpoint, **overrides)``: ``make_client`` with this test's pull transport."""

    def make(endpoint: str, **overrides) -> PeerClient:
        return make_client(endpoint, pull_transport=transport, **overrides)

    return make


def sentinel_buffer(rows: int, size: int) -> np.ndarray:
    return np.full((rows, size), SENTINEL, dtype=np.uint8)


def assert_loaded_rows_exact(result, dest: np.ndarray, expected: np.ndarray) -> None:
    """Every row reported loaded holds exactly the served bytes."""
    for i, loaded in enumerate(result.loaded):
        if loaded:
            assert np.array_equal(dest[i], expected[i]), f"row {i} reported loaded but differs"


def start_pull(client: PeerClient, lease_id: str, targets, **kwargs):
    """Run ``client.pull`` on a thread; returns (thread, one-element result list)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(client.pull(lease_id, targets, **kwargs)))
    thread.start()
    return thread, out
