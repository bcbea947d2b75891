"""TLS and mutual TLS for service-to-service calls, with certificates made by openssl."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.app import Controller, start_controller
from controller.config import Config
from tests.e2e.helpers import sibling_config

pytestmark = pytest.mark.e2e


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    where = tmp_path_factory.mktemp("tls")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=where,
    )
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=where,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            f"{name}.pem",
            *extra,
            cwd=where,
        )
    return where


@pytest.fixture(scope="module")
async def mutual_tls(
    e2e_config: Config, controller: Controller, certificates: Path
) -> AsyncIterator[Controller]:
    config = sibling_config(
        e2e_config,
        controller,
        "tls",
        state_dir=certificates / "state",
        tls_cert=certificates / "server.pem",
        tls_key=certificates / "server.key",
        tls_client_ca=certificates / "ca.pem",
    )
    running = await start_controller(config)
    yield running
    await running.stop(grace=1)


async def check_health(port: int, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(answer.status)


async def test_a_client_with_a_certificate_gets_in(
    mutual_tls: Controller, certificates: Path
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certificates / "ca.pem").read_bytes(),
        private_key=(certificates / "client.key").read_bytes(),
        certificate_chain=(certificates / "client.pem").read_bytes(),
    )
    assert (
        await check_health(mutual_tls.port, credentials) == health_pb2.HealthCheckResponse.SERVING
    )


async def test_a_client_without_a_certificate_is_turned_away(
    mutual_tls: Controller, certificates: Path
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certificates / "ca.pem").read_bytes()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check_health(mutual_tls.port, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_is_turned_away(mutual_tls: Controller) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mutual_tls.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
