"""The gateway reaches nodes that serve TLS: it verifies their certificates by --node-tls-ca
(under --node-tls-name), and shows its own certificate to nodes that require one."""

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from controller.config import Config, validate
from controller.gateway.server import start_gateway
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.tls import self_signed
from tests.unit.controller.inprocess import PARENT, Petri, fast_petri
from tests.unit.gateway.fakes import MemoryNodes, node_record
from tests.unit.gateway.harness import CONNECT_TIMEOUT

NODE_NAME = "petri-node"  # the name in the nodes' certificate: not their address


def certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for DNS name `name` (its own CA) and its key."""
    return self_signed(directory, name)


@contextlib.asynccontextmanager
async def tls_node(tmp_path: Path, client_ca: Path | None = None) -> AsyncIterator[Petri]:
    cert, key = certificate(tmp_path, NODE_NAME)
    async with fast_petri(tmp_path, tls_cert=cert, tls_key=key, tls_client_ca=client_ca) as petri:
        yield petri


async def list_through_gateway(petri: Petri, **gateway_settings: Any) -> grpc.StatusCode:
    """What a ListSandboxes through a gateway with these settings in front of `petri` ends
    with."""
    config = dataclasses.replace(
        petri.config,
        listen="127.0.0.1:0",
        tls_cert=None,
        tls_key=None,
        tls_client_ca=None,
        **gateway_settings,
    )
    assert validate(config) == [], validate(config)
    nodes = MemoryNodes([node_record("node-1", f"127.0.0.1:{petri.controller.port}")])

    async def locate(project: str, sandbox_id: str) -> str | None:
        return None

    gateway = await start_gateway(config, nodes, locate, connect_timeout=CONNECT_TIMEOUT)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            try:
                await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK
    finally:
        await gateway.stop(0)


async def test_the_gateway_verifies_the_nodes_by_the_ca(tmp_path: Path) -> None:
    wrong_ca, _ = certificate(tmp_path, "another-ca")
    async with tls_node(tmp_path) as petri:
        ca = petri.config.tls_cert
        assert await list_through_gateway(petri, node_tls_ca=ca, node_tls_name=NODE_NAME) == (
            grpc.StatusCode.OK
        )
        # Another CA, the address's own name instead of the certificate's, or plaintext: the
        # node cannot be reached, and the caller is told so.
        for settings in (
            {"node_tls_ca": wrong_ca, "node_tls_name": NODE_NAME},
            {"node_tls_ca": ca},
            {},
        ):
            got = await list_through_gateway(petri, **settings)
            assert got == grpc.StatusCode.UNAVAILABLE, settings


async def test_nodes_requiring_client_certificates_take_the_gateways(tmp_path: Path) -> None:
    gateway_cert, gateway_key = certificate(tmp_path, "petri-gateway")
    stranger_cert, stranger_key = certificate(tmp_path, "stranger")
    async with tls_node(tmp_path, client_ca=gateway_cert) as petri:
        tls = {"node_tls_ca": petri.config.tls_cert, "node_tls_name": NODE_NAME}
        with_cert = {"node_tls_cert": gateway_cert, "node_tls_key": gateway_key}
        assert await list_through_gateway(petri, **tls, **with_cert) == grpc.StatusCode.OK
        assert await list_through_gateway(petri, **tls) == grpc.StatusCode.UNAVAILABLE
        stranger = {"node_tls_cert": stranger_cert, "node_tls_key": stranger_key}
        assert await list_through_gateway(petri, **tls, **stranger) == grpc.StatusCode.UNAVAILABLE


def test_node_tls_settings_go_together() -> None:
    cert, key = Path("gateway.crt"), Path("gateway.key")
    assert "node_tls_cert and node_tls_key go together" in validate(Config(node_tls_cert=cert))
    needs_ca = "node_tls_cert and node_tls_name need node_tls_ca (TLS to the nodes)"
    assert needs_ca in validate(Config(node_tls_cert=cert, node_tls_key=key))
    assert needs_ca in validate(Config(node_tls_name="petri-node"))
    assert validate(Config(node_tls_ca=cert, node_tls_cert=cert, node_tls_key=key)) == []
