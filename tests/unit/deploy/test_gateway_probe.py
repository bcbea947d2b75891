"""The gateways' health probe (base/gateway.yaml), run as the kubelet runs it, against a real
gRPC server with TLS and the standard health service: SERVING passes; NOT_SERVING, a
certificate for another name and no server fail."""

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.tls import self_signed

GATEWAY = Path(__file__).resolve().parents[3] / "deploy/kubernetes/base/gateway.yaml"
CA_IN_POD = "/etc/petri/tls/ca.crt"
ADDRESS_IN_POD = "127.0.0.1:50051"


def probe_command() -> list[str]:
    yaml: Any = importlib.import_module("yaml")  # PyYAML comes with kubernetes-validate (dev)
    documents = [d for d in yaml.safe_load_all(GATEWAY.read_text()) if d]
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    commands = [container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe")]
    commands.append(container["livenessProbe"]["exec"]["command"])
    assert commands[0] == commands[1] == commands[2], "the three probes differ"
    command: list[str] = commands[0]
    assert command[0] == "python"
    assert CA_IN_POD in command[-1] and ADDRESS_IN_POD in command[-1]
    return command


def make_certificate(directory: Path, name: str) -> tuple[bytes, bytes]:
    cert, key = self_signed(directory, name)
    return key.read_bytes(), cert.read_bytes()


class Server:
    def __init__(self, key: bytes, cert: bytes) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        credentials = grpc.ssl_server_credentials([(key, cert)])
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def set(self, status: int) -> None:
        self.health.set("", status)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    key, cert = make_certificate(tmp_path, "petri-gateway")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(cert)
    running = Server(key, cert)
    yield running, ca
    running.server.stop(grace=None)


def run_probe(port: int, ca: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = probe_command()
    script = command[-1].replace(CA_IN_POD, str(ca)).replace(ADDRESS_IN_POD, f"127.0.0.1:{port}")
    result = subprocess.run(
        [sys.executable, *command[1:-1], script],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return result


def test_probe_passes_while_serving(server: tuple[Server, Path]) -> None:
    running, ca = server
    running.set(health_pb2.HealthCheckResponse.SERVING)
    result = run_probe(running.port, ca)
    assert result.returncode == 0, result.stderr


def test_probe_fails_when_not_serving(server: tuple[Server, Path]) -> None:
    running, ca = server
    running.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_probe(running.port, ca)
    # The answer was read and judged: exit 1, no exception.
    assert (result.returncode, result.stderr) == (1, "")


def test_probe_checks_the_certificate_name(server: tuple[Server, Path]) -> None:
    running, ca = server
    running.set(health_pb2.HealthCheckResponse.SERVING)
    result = run_probe(running.port, ca, PROBE_TLS_NAME="someone-else")
    assert result.returncode != 0
    assert "Hostname Verification Check failed" in result.stderr  # not some other failure


def test_probe_fails_without_a_server(server: tuple[Server, Path]) -> None:
    running, ca = server
    running.server.stop(grace=None)
    result = run_probe(running.port, ca)
    assert result.returncode != 0
    assert "UNAVAILABLE" in result.stderr
