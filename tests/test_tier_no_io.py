"""vLLM's calls into the tier never touch a socket, proven at the system-call level.

vLLM calls the tier under its manager lock from the scheduler thread: a socket
call there would stall every request of the engine for a network round trip.
The tier's contract is that lookup, submit_load, submit_store,
serve_external_requests and the rest only queue work for kvpeer's own threads.
This test traces a real node with strace while one thread drives a whole
request through vLLM's manager — lookups that start remote resolutions,
promotions that pull chunks from a peer, stores that publish, and steps that
serve a peer's lookup — and asserts that neither that thread nor the
engine-step thread made a network system call or wrote to a socket.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time

import pytest

from kvpeer.sim.rows import chunk_keys
from tests.support.cluster import hexkeys

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("strace") is None, reason="needs strace (scripts/setup.sh installs it)"
    ),
]

#: System calls that mean network I/O, or a wait on file descriptors, by themselves.
NETWORK_CALLS = {
    "socket", "connect", "accept", "accept4", "bind", "listen", "shutdown",
    "send", "sendto", "sendmsg", "sendmmsg", "recv", "recvfrom", "recvmsg", "recvmmsg",
    "getsockopt", "setsockopt", "poll", "ppoll", "select", "pselect6",
    "epoll_wait", "epoll_pwait", "epoll_pwait2",
}  # fmt: skip
#: Reads and writes count when their descriptor is a socket (strace -yy names it).
FD_CALLS = {"read", "write", "readv", "writev", "pread64", "pwrite64"}
_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)[( ](.*)$")


def _calls_between_markers(trace: str, tids: set[int]) -> list[tuple[int, str, str]]:
    calls, inside = [], False
    for line in trace.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        tid, name, rest = int(match.group(1)), match.group(2), match.group(3)
        if "kvpeer-probe-begin" in rest:
            inside = True
        elif "kvpeer-probe-end" in rest:
            inside = False
        elif inside and tid in tids:
            calls.append((tid, name, rest))
    return calls


def test_scheduler_calls_make_no_socket_io(cluster, tmp_path):
    holder, node = cluster.pair(
        consumer={
            "name": "traced",
            # Serve peers on the scheduler's steps only, not from vLLM's tier-poll thread.
            "extra_config": {"tier_poll_interval_s": 0},
        }
    )
    remote = chunk_keys("remote-prefix", 8)
    local = chunk_keys("local-chunks", 4)
    holder.call("store", keys=hexkeys(remote))
    node.call("store", keys=hexkeys(local))

    trace_file = tmp_path / "strace.txt"
    syscalls = ",".join(sorted(NETWORK_CALLS | FD_CALLS))
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-yy", "-s", "32", "-e", f"trace={syscalls}",
         "-o", str(trace_file), "-p", str(node.info["pid"])],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(2.0)  # attach to every thread
        if tracer.poll() is not None:
            pytest.skip(f"strace cannot attach here: {tracer.stderr.read().decode()[:200]}")
        probe = node.call("probe_caller_io", keys=hexkeys(remote), inbound_keys=hexkeys(local))
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)

    assert probe["hit_chunks"] == 8, "the request loaded its prefix from the peer"
    assert probe["served_hits"] == 4, "the steps served the peer's lookup"
    trace = trace_file.read_text()
    assert "kvpeer-probe-begin" in trace and "kvpeer-probe-end" in trace
    calls = _calls_between_markers(trace, {probe["tid"], probe["engine_tid"]})
    offending = [
        (tid, name, rest[:80])
        for tid, name, rest in calls
        if name in NETWORK_CALLS
        or (name in FD_CALLS and re.match(r"\d+<(socket|TCP|UDP|UNIX|NETLINK)", rest))
    ]
    assert offending == []
    # The tracer saw the network I/O, on kvpeer's own threads.
    others = _calls_between_markers(trace, set(map(int, re.findall(r"^(\d+) ", trace, re.M))))
    assert any(name in NETWORK_CALLS for _, name, _ in others)
