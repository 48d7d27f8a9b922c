"""compose/: the files are valid, every command parses, every config is accepted.

Docker is not needed: the compose files are read as compose reads them
(tests/support/compose.py); ``docker-compose config`` (1.29, Debian's, which
scripts/setup.sh installs) validates them against its Compose schema, and
``docker compose config`` is compared too where the compose plugin is installed. The TLS variant runs compose/gen-certs.sh and points
the mounted certificate paths at what it wrote.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.security import Security
from kvpeer.cli import COMMANDS, build_parser
from kvpeer.cli.proxy import config_from_args
from kvpeer.server.grpc_server import GrpcServer
from kvpeer.tier.config import TierConfig
from tests.support.compose import (
    COMPOSE_DIR,
    NODES,
    VARIANTS,
    byte_size,
    host_path,
    kv_transfer_config,
    load_compose,
    load_env,
)

#: Keys vLLM's SecondaryTierFactory pops before calling the tier's constructor.
VLLM_POPPED_TIER_KEYS = ("type", "module_path", "backpressure")
SERVICES = {"redis", "directory", "directory-2", "prefill", "decode", "proxy"}
#: The directory replicas (on the compose file's one Redis).
DIRECTORIES = ("directory", "directory-2")
GEN_CERTS = COMPOSE_DIR / "gen-certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(GEN_CERTS), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def env(certs: Path) -> dict[str, str]:
    return load_env() | {"CERTS_DIR": str(certs)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def compose(variant: str, env: dict[str, str]) -> dict[str, Any]:
    return load_compose(VARIANTS[variant], env)


def _tier(compose: dict[str, Any], node: str) -> dict[str, Any]:
    (tier,) = kv_transfer_config(compose["services"][node])["kv_connector_extra_config"][
        "secondary_tiers"
    ]
    return tier


def _tier_kwargs(compose: dict[str, Any], node: str) -> dict[str, Any]:
    """What vLLM passes to PeerSecondaryTier, with mounted paths mapped to the host."""
    service = compose["services"][node]
    kwargs = {k: v for k, v in _tier(compose, node).items() if k not in VLLM_POPPED_TIER_KEYS}
    if "tls" in kwargs:
        kwargs["tls"] = {k: host_path(service, v) for k, v in kwargs["tls"].items()}
    if "auth_token_file" in kwargs:
        kwargs["auth_token_file"] = host_path(service, kwargs["auth_token_file"])
    return kwargs


def _vllm_port(service: dict[str, Any]) -> int:
    (flag,) = [a for a in service["command"] if str(a).startswith("--port=")]
    return int(flag.split("=", 1)[1])


def _kvpeer_args(service: dict[str, Any]) -> argparse.Namespace:
    """A kvpeer service's command parsed by ``kvpeer``'s own parser."""
    assert service["entrypoint"] == ["kvpeer"]
    module = COMMANDS[service["command"][0]][0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not built yet")
    return build_parser().parse_args(service["command"])


# -- structure --------------------------------------------------------------------


def test_services_images_health_checks_and_published_ports(
    compose: dict[str, Any], env: dict[str, str]
) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        if name == "redis":
            assert service["image"] == env["REDIS_IMAGE"]
            continue
        assert service["image"] == env["KVPEER_IMAGE"], name
        assert service["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}, name
    published = {
        name: sorted(tuple(map(int, p.split(":"))) for p in s["ports"])
        for name, s in services.items()
        if "ports" in s  # redis and the second directory are reached inside the network
    }
    assert published == {
        "directory": [
            (int(env["DIRECTORY_PORT"]), 7600),
            (int(env["DIRECTORY_METRICS_PORT"]), 9100),
        ],
        "prefill": [(int(env["PREFILL_KVPEER_PORT"]), 7601), (int(env["PREFILL_HTTP_PORT"]), 8000)],
        "decode": [(int(env["DECODE_KVPEER_PORT"]), 7601), (int(env["DECODE_HTTP_PORT"]), 8000)],
        "proxy": [(int(env["PROXY_PORT"]), 8000)],
    }
    host_ports = [host for ports in published.values() for host, _ in ports]
    assert len(host_ports) == len(set(host_ports)), "two services publish one host port"
    assert (COMPOSE_DIR / "Dockerfile").is_file()


def test_vllm_nodes_gpus_seed_and_shared_memory(
    compose: dict[str, Any], env: dict[str, str]
) -> None:
    for node in NODES:
        service = compose["services"][node]
        assert service["entrypoint"] == ["vllm", "serve"]
        assert service["command"][0] == env["MODEL"]
        for directory in DIRECTORIES:
            assert service["depends_on"][directory]["condition"] == "service_healthy"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {
            "driver": "nvidia",
            "device_ids": [env[f"{node.upper()}_GPU"]],
            "capabilities": ["gpu"],
        }
        extra = kv_transfer_config(service)["kv_connector_extra_config"]
        margin = byte_size(service["shm_size"]) - extra["cpu_bytes_to_use"]
        assert margin >= 1 << 30, f"{node}: shm_size leaves {margin} bytes beside the tier"
    seeds = {compose["services"][n]["environment"]["PYTHONHASHSEED"] for n in NODES}
    assert len(seeds) == 1 and seeds != {""}, "both nodes need one PYTHONHASHSEED"
    # Everything that decides chunk keys and bytes is the same on both nodes.
    prefill, decode = (compose["services"][n]["command"] for n in NODES)
    assert prefill[:-1] == decode[:-1]


# -- commands -----------------------------------------------------------------------


@pytest.mark.parametrize("name", DIRECTORIES)
def test_directory_command_parses(compose: dict[str, Any], variant: str, name: str) -> None:
    service = compose["services"][name]
    args = _kvpeer_args(service)
    assert args.command == "directory"
    assert args.listen == "0.0.0.0:7600"
    assert args.store == "redis://redis:6379/0"  # both replicas on the one Redis
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    tls_files = (args.tls_cert, args.tls_key, args.tls_ca, args.auth_token_file)
    if variant == "tls":
        for path in tls_files:
            assert Path(host_path(service, path)).is_file(), path
        check = service["healthcheck"]["test"]
        assert f"--tls-ca={args.tls_ca}" in check and f"--tls-cert={args.tls_cert}" in check
    else:
        assert tls_files == (None, None, None, None)


def test_proxy_command_parses_and_points_at_the_nodes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    args = _kvpeer_args(services["proxy"])
    assert args.command == "proxy"
    config, listen = config_from_args(args)
    assert listen.port == 8000
    prefill_port, decode_port = (_vllm_port(services[n]) for n in NODES)
    assert [n.url for n in config.prefill] == [f"http://prefill:{prefill_port}"]
    assert config.decode == (f"http://decode:{decode_port}",)
    assert str(config.prefill[0].kvpeer) == _tier(compose, "prefill")["advertise"]
    assert {"prefill", "decode"} <= set(services["proxy"]["depends_on"])


def test_tier_config_is_accepted_by_kvpeer(compose: dict[str, Any], variant: str) -> None:
    for node in NODES:
        transfer = kv_transfer_config(compose["services"][node])
        assert transfer["kv_connector"] == "OffloadingConnector"
        assert transfer["kv_role"] == "kv_both"
        extra = transfer["kv_connector_extra_config"]
        assert extra["spec_name"] == "TieringOffloadingSpec"
        assert extra["canonical_layout"] is True
        assert isinstance(extra["cpu_bytes_to_use"], int) and extra["cpu_bytes_to_use"] > 0
        tier = _tier(compose, node)
        assert (tier["type"], tier["module_path"]) == ("PeerSecondaryTier", "kvpeer.tier")

        config = TierConfig.from_kwargs(_tier_kwargs(compose, node))
        assert config.advertised == Endpoint(node, config.listen.port)
        assert config.directory == tuple(Endpoint(name, 7600) for name in DIRECTORIES)
        if variant == "tls":
            assert config.security.tls is not None and config.security.tls.ca is not None
            assert (
                config.security.token
                == Path(_tier_kwargs(compose, node)["auth_token_file"]).read_text().strip()
            )
        else:
            assert config.security == Security()


def test_tls_variant_is_the_plain_one_plus_security(env: dict[str, str]) -> None:
    plain, tls = (load_compose(VARIANTS[v], env) for v in ("plain", "tls"))
    for node in NODES:
        secured = dict(_tier(tls, node))
        assert set(secured.pop("tls")) == {"cert", "key", "ca"}
        assert secured.pop("auth_token_file")
        assert secured == _tier(plain, node)
        assert tls["services"][node]["command"][:-1] == plain["services"][node]["command"][:-1]
    assert tls["services"]["proxy"] == plain["services"]["proxy"]


def _assert_commands_agree(theirs: dict[str, Any], variant: str, env: dict[str, str]) -> None:
    """Compose's own reading of every service's command and entrypoint is ours."""
    ours = load_compose(VARIANTS[variant], env)["services"]
    for name in SERVICES:
        assert theirs[name]["command"] == ours[name]["command"], name
        assert theirs[name].get("entrypoint") == ours[name].get("entrypoint"), name


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="the docker compose plugin is not installed",
)
def test_docker_compose_config_agrees(variant: str, env: dict[str, str]) -> None:
    files = [arg for name in VARIANTS[variant] for arg in ("-f", str(COMPOSE_DIR / name))]
    out = subprocess.run(
        ["docker", "compose", *files, "config", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "CERTS_DIR": env["CERTS_DIR"]},
    )
    _assert_commands_agree(json.loads(out.stdout)["services"], variant, env)


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian's, installed by scripts/setup.sh) is not installed",
)
def test_docker_compose_v1_validates_the_files(
    variant: str, env: dict[str, str], tmp_path: Path
) -> None:
    """docker-compose 1.29 checks each file against its Compose schema, without a daemon.

    It predates the top-level ``name`` (the project name), so that one line is
    left out of the copies it reads; everything else is validated as written.
    """
    files = []
    for name in VARIANTS[variant]:
        text = (COMPOSE_DIR / name).read_text()
        copy = tmp_path / name
        copy.write_text(re.sub(r"(?m)^name: .*\n", "", text))
        files += ["-f", str(copy)]
    out = subprocess.run(
        ["docker-compose", "--project-directory", str(COMPOSE_DIR), *files, "config"],
        capture_output=True,
        text=True,
        env={**os.environ, "CERTS_DIR": env["CERTS_DIR"]},
    )
    assert out.returncode == 0, out.stderr
    _assert_commands_agree(yaml.safe_load(out.stdout)["services"], variant, env)


# -- certificates -------------------------------------------------------------------


def test_generated_certificates_give_mutual_tls_with_a_token(certs: Path) -> None:
    files = {name: str(certs / f"{name}.pem") for name in ("node", "client", "ca")}
    keys = {name: str(certs / f"{name}.key") for name in ("node", "client")}
    server = GrpcServer(
        "127.0.0.1:0",
        [],
        Security.from_config(
            {"cert": files["node"], "key": keys["node"], "ca": files["ca"]},
            str(certs / "token"),
        ),
    ).start()
    target = f"127.0.0.1:{server.port}"

    def call(security: Security) -> None:
        with security.open_channel(target) as channel:
            responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            assert next(responses).list_services_response.service

    def client(cert: str = "client", token: bool = True, **tls: str) -> Security:
        paths = {"cert": files[cert], "key": keys[cert], "ca": files["ca"], **tls}
        return Security.from_config(paths, str(certs / "token") if token else None)

    try:
        # Every name the services dial each other by is in the node certificate.
        for name in (*DIRECTORIES, "prefill", "decode", "localhost"):
            call(client(server_name=name))
            call(client("node", server_name=name))
        with pytest.raises(grpc.RpcError) as refused:
            call(client(server_name="localhost", token=False))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):  # no client certificate: mutual TLS refuses
            call(Security.from_config({"ca": files["ca"], "server_name": "localhost"}))
        with pytest.raises(grpc.RpcError):  # a name not in the certificate
            call(client(server_name="elsewhere"))

        check = [
            sys.executable,
            str(COMPOSE_DIR / "grpc_health_check.py"),
            f"localhost:{server.port}",
        ]
        tls_flags = [
            f"--tls-cert={files['node']}",
            f"--tls-key={keys['node']}",
            f"--tls-ca={files['ca']}",
        ]
        ok = subprocess.run([*check, *tls_flags], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        plain = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert plain.returncode == 1 and "grpc_health_check: localhost" in plain.stderr
    finally:
        server.stop(grace=None)


def test_gen_certs_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    subprocess.run(["bash", str(GEN_CERTS), str(tmp_path)], check=True, capture_output=True)
    first = (tmp_path / "ca.pem").read_bytes()
    again = subprocess.run(["bash", str(GEN_CERTS), str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 1 and "--force" in again.stderr
    assert (tmp_path / "ca.pem").read_bytes() == first
    forced = subprocess.run(["bash", str(GEN_CERTS), "--force", str(tmp_path)], capture_output=True)
    assert forced.returncode == 0
    assert (tmp_path / "ca.pem").read_bytes() != first
    assert oct((tmp_path / "node.key").stat().st_mode & 0o777) == "0o600"


# -- vLLM's own parsing ---------------------------------------------------------------

# Parses each node's arguments with `vllm serve`'s real parser and resolves the tier
# class as vLLM's SecondaryTierFactory does. The CPU platform lets the parser build
# its defaults on a machine without a GPU.
_VLLM_CHECK = """
import json, sys
from vllm.config import KVTransferConfig
from vllm.entrypoints.common.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

parser = make_arg_parser(FlexibleArgumentParser())
results = {}
for name, argv in json.load(sys.stdin).items():
    args = parser.parse_args(argv)
    config = args.kv_transfer_config
    assert isinstance(config, KVTransferConfig), type(config)
    tiers = config.kv_connector_extra_config["secondary_tiers"]
    results[name] = {
        "model": args.model_tag,
        "block_size": args.block_size,
        "connector": config.kv_connector,
        "role": config.kv_role,
        "tier_class": [SecondaryTierFactory.get_tier_class(t).__qualname__ for t in tiers],
    }
print("RESULT " + json.dumps(results))
"""


@pytest.mark.slow
def test_vllm_accepts_the_node_commands(env: dict[str, str]) -> None:
    argv = {
        f"{variant}/{node}": load_compose(files, env)["services"][node]["command"]
        for variant, files in VARIANTS.items()
        for node in NODES
    }
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_CHECK],
        input=json.dumps(argv),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    for name, result in results.items():
        assert result == {
            "model": env["MODEL"],
            "block_size": int(env["BLOCK_SIZE"]),
            "connector": "OffloadingConnector",
            "role": "kv_both",
            "tier_class": ["PeerSecondaryTier"],
        }, name
