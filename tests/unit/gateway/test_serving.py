"""The gateway serves as a single controller does: TLS, tokens, health without a token,
reflection."""

import hashlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controller.config import Config
from controller.gateway.server import start_gateway
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import PROFILE, fast_config, serving, short_runtime_dir
from tests.unit.deploy.test_gateway_probe import make_certificate
from tests.unit.gateway.fakes import MemoryNodes, node_record, running_node
from tests.unit.gateway.harness import name_of


async def _nowhere(project: str, sandbox_id: str) -> str | None:
    return None


async def test_tls_tokens_health_and_reflection(tmp_path: Path) -> None:
    key, cert = make_certificate(tmp_path, "petri-gateway")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    tokens = tmp_path / "tokens.toml"
    digest = hashlib.sha256(b"secret-a").hexdigest()
    tokens.write_text(f'[[tokens]]\nname = "agent-a"\nsha256 = "{digest}"\nprojects = ["*"]\n')
    config = Config(
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        tls_cert=tmp_path / "tls.crt",
        tls_key=tmp_path / "tls.key",
        tokens_file=tokens,
    )
    async with running_node("node-a") as (node, address):
        gateway = await start_gateway(
            config, MemoryNodes([node_record("node-a", address)]), _nowhere
        )
        credentials = grpc.ssl_channel_credentials(cert)
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{gateway.port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "petri-gateway")],
        )
        try:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest())  # no token needed
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            token = (("authorization", "Bearer secret-a"),)
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            got = await stub.GetSandbox(
                sandbox_pb2.GetSandboxRequest(name=name_of("s1")), metadata=token
            )
            assert got.display_name == "node-a"
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            services = set()
            async for answer in reflection.ServerReflectionInfo(iter([request]), metadata=token):
                services = {s.name for s in answer.list_services_response.service}
            assert "petri.v1.SandboxService" in services
            assert "grpc.health.v1.Health" in services
        finally:
            await channel.close()
            await gateway.stop(0)
    assert [seen.metadata["authorization"] for seen in node.seen] == ["Bearer secret-a"]


async def test_a_port_another_server_holds_is_refused_not_shared(tmp_path: Path) -> None:
    """grpc would share it (SO_REUSEPORT): calls meant for one would reach the other."""
    holder = grpc.aio.server()  # grpc's defaults, as any other gRPC server has them
    port = holder.add_insecure_port("127.0.0.1:0")
    await holder.start()
    try:
        taken = f"127.0.0.1:{port}"
        config = Config(listen=taken, state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
        with pytest.raises(OSError, match=f"cannot listen on {taken}: the address is in use"):
            await start_gateway(config, MemoryNodes([]), _nowhere)
        with short_runtime_dir() as runtime_dir:
            node = fast_config(tmp_path / "node", runtime_dir, listen=taken)
            runtime = FakeRuntime({node.image_for(PROFILE)})
            try:
                with pytest.raises(OSError, match=f"cannot listen on {taken}: the address is in"):
                    async with serving(node, runtime):
                        pass
            finally:
                await runtime.shutdown()
    finally:
        await holder.stop(None)
