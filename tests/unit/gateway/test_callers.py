"""The request guard makes each method's handler once per caller and reuses it: each call is
still its own caller's, with that caller's projects, whoever called the method before."""

import hashlib
from pathlib import Path

import grpc
import pytest

from petri.v1 import sandbox_pb2
from tests.unit.gateway.fakes import MemoryNodes, node_record, running_node
from tests.unit.gateway.harness import running_gateway


async def test_calls_of_two_callers_in_turn_are_each_their_own_callers(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        "".join(
            f'[[tokens]]\nname = "agent-{who}"\nsha256 = "{hashlib.sha256(secret).hexdigest()}"\n'
            f'projects = ["{project}"]\n'
            for who, secret, project in (("a", b"secret-a", "alpha"), ("b", b"secret-b", "beta"))
        )
    )
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}, tokens_file=tokens) as (
            _,
            stub,
            _,
        ):
            for _ in range(3):
                for who, mine, other in (("a", "alpha", "beta"), ("b", "beta", "alpha")):
                    metadata = (("authorization", f"Bearer secret-{who}"),)
                    request = sandbox_pb2.GetSandboxRequest(name=f"projects/{mine}/sandboxes/s1")
                    await stub.GetSandbox(request, metadata=metadata)
                    request = sandbox_pb2.GetSandboxRequest(name=f"projects/{other}/sandboxes/s1")
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.GetSandbox(request, metadata=metadata)
                    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
                    assert f"agent-{who} may not use project '{other}'" in (
                        caught.value.details() or ""
                    )
    assert [s.metadata["authorization"] for s in a.seen] == [
        "Bearer secret-a",
        "Bearer secret-b",
    ] * 3
