"""A directory name that resolves to several addresses is several replicas to the client.

Two real ``kvpeer directory`` replicas on one real Redis listen on 127.0.0.1:P and
127.0.0.2:P. The client, real :class:`DirectoryClient` s, runs in a private mount
namespace whose ``/etc/hosts`` maps ``directory.test`` to both addresses
(``unshare -m`` and a bind mount, as a DNS record with two A records would). gRPC's
``round_robin`` policy spreads the calls over both and, once one replica is
SIGKILLed, skips it. Skipped where the machine allows no mount namespace.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from kvpeer.sim.directory import DirectoryProcess
from tests.support.redis_server import RedisServer, free_port

NAME = "directory.test"

# Runs inside the namespace: publish, locate 40 times, wait for "go", locate 40 more.
CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from kvpeer.api.fingerprint import Fingerprint
    from kvpeer.client.directory import DirectoryClient

    target = sys.argv[1]
    fp = Fingerprint.of(model="dns", dtype="float16", tokens_per_hash=16)
    holder = DirectoryClient(target, node_id="holder", advertise="holder.test:7601",
                             fingerprint=fp, rpc_timeout_s=1.0)
    consumer = DirectoryClient(target, node_id="consumer", advertise="consumer.test:7601",
                               fingerprint=fp, rpc_timeout_s=1.0, publish=False,
                               locate_backoff_s=0.1)
    keys = [b"dns-%d" % i for i in range(100)]
    keys = [k.ljust(36, b"\\0") for k in keys]
    holder.start()
    holder.publish(keys)
    assert holder.flush(20), "publish not acknowledged"

    def locates(n):
        found, slowest = 0, 0.0
        for _ in range(n):
            began = time.monotonic()
            location = consumer.locate(keys)
            slowest = max(slowest, time.monotonic() - began)
            found += location.ok and all(location.holders)
        return found, slowest

    before = locates(40)
    print("ready", flush=True)
    sys.stdin.readline()
    after = locates(40)
    print(json.dumps({"before": before, "after": after}), flush=True)
    holder.close()
    consumer.close()
    """
)


def _namespace_works(hosts: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts && getent hosts {NAME}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return probe.returncode == 0 and "127.0.0.2" in probe.stdout


def _locates_served(process: DirectoryProcess) -> float:
    url = f"http://{process.host}:{process.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    pattern = r'kvpeer_directory_requests_total\{code="OK",method="Locate"\} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def test_a_name_with_two_addresses_spreads_calls_and_skips_a_dead_replica(tmp_path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n127.0.0.2 {NAME}\n")
    if not _namespace_works(hosts):
        pytest.skip("this machine allows no private mount namespace (unshare -m)")
    port = free_port()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with RedisServer() as redis:
        args = ["--store", redis.url, "--lease-ttl", "30"]
        one = DirectoryProcess(args, host="127.0.0.1", port=port)
        two = DirectoryProcess(args, host="127.0.0.2", port=port)
        client = subprocess.Popen(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                f'mount --bind {hosts} /etc/hosts && exec "$0" "$@"',
                sys.executable,
                str(script),
                f"{NAME}:{port}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert client.stdout is not None and client.stdin is not None
            line = client.stdout.readline().strip()
            assert line == "ready", client.communicate(timeout=30)[1]
            assert _locates_served(one) > 0 and _locates_served(two) > 0  # spread over both
            one.kill()
            out, err = client.communicate("go\n", timeout=120)
            assert client.returncode == 0, err
            result = json.loads(out.strip().splitlines()[-1])
            assert result["before"][0] == 40
            found, slowest = result["after"]
            assert found == 40, "a locate missed after one address died"
            assert slowest < 1.5, "a locate waited on the dead replica"
        finally:
            if client.poll() is None:
                client.kill()
            one.close()
            two.close()
