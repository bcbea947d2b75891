"""The gateway remembers where each sandbox was lately instead of asking the registry on every
call; the nodes stay the authority: a node that does not hold a sandbox refuses the call having
done nothing, and the gateway sends it once more to where the registry says now."""

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.config import Config
from controller.errors import FailedPrecondition, NotFound, PetriError, status_details
from controller.gateway.forward import Locations
from controller.gateway.server import start_gateway
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.unit.gateway.fakes import CHUNK, MemoryNodes, node_record
from tests.unit.gateway.harness import CONNECT_TIMEOUT, name_of

Context = grpc.aio.ServicerContext[Any, Any]


class HoldingNode(sandbox_pb2_grpc.SandboxServiceServicer):
    """A node that answers only for the sandboxes the registry (`holders`) says are its own and
    refuses the others as a real node does (controller.sandboxes.lookup)."""

    def __init__(self, name: str, holders: dict[str, str]) -> None:
        self.name = name
        self.holders = holders
        self.calls: list[str] = []
        # Run once the node has looked the sandbox up, before it answers: a race to stage.
        self.then: Callable[[], None] | None = None
        self.server: grpc.aio.Server | None = None

    async def _check(self, name: str, context: Context) -> None:
        holder = self.holders.get(name.rpartition("/")[2])
        if self.then is not None:
            self.then()
        error: PetriError | None = None
        if holder is None:
            error = NotFound(f"sandbox {name} was deleted", reason="SANDBOX_DELETED")
        elif holder != self.name:
            error = FailedPrecondition(
                f"sandbox {name} is held by node {holder}, not this one ({self.name})",
                reason="SANDBOX_ON_ANOTHER_NODE",
                metadata={"node": holder},
            )
        if error is not None:
            await context.abort(error.status, str(error), status_details(error))

    async def GetSandbox(
        self, request: sandbox_pb2.GetSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        self.calls.append("GetSandbox")
        await self._check(request.name, context)
        return sandbox_pb2.Sandbox(name=request.name, display_name=self.name)

    async def ReadFile(
        self, request: files_pb2.ReadFileRequest, context: Context
    ) -> AsyncIterator[execution_pb2.FileChunk]:
        self.calls.append("ReadFile")
        await self._check(request.name, context)
        yield execution_pb2.FileChunk(path=self.name, data=CHUNK[:10], final=True)


@contextlib.asynccontextmanager
async def holding_nodes(
    tmp_path: Path, holders: dict[str, str], *names: str
) -> AsyncIterator[tuple[dict[str, HoldingNode], Any, list[str]]]:
    """Nodes of those names and a gateway in front of them: (nodes, stub, the sandbox ids the
    gateway looked up in the registry, in order)."""
    nodes: dict[str, HoldingNode] = {}
    records = []
    servers = []
    looked_up: list[str] = []

    async def locate(project: str, sandbox_id: str) -> str | None:
        looked_up.append(sandbox_id)
        return holders.get(sandbox_id)

    try:
        for name in names:
            nodes[name] = HoldingNode(name, holders)  # type: ignore[abstract]  # UNIMPLEMENTED
            server = grpc.aio.server()
            sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(nodes[name], server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            nodes[name].server = server
            records.append(node_record(name, f"127.0.0.1:{port}"))
        config = Config(
            listen="127.0.0.1:0", state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"
        )
        gateway = await start_gateway(
            config, MemoryNodes(records), locate, connect_timeout=CONNECT_TIMEOUT
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        try:
            yield nodes, sandbox_pb2_grpc.SandboxServiceStub(channel), looked_up
        finally:
            await channel.close()
            await gateway.stop(0)
    finally:
        for server in servers:
            await server.stop(None)


async def _get(stub: Any, sandbox_id: str) -> str:
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of(sandbox_id)))
    return str(got.display_name)


async def _read(stub: Any, sandbox_id: str) -> str:
    request = files_pb2.ReadFileRequest(name=name_of(sandbox_id), path="f")
    return "".join([chunk.path async for chunk in stub.ReadFile(request)])


async def test_calls_to_a_sandbox_look_it_up_once_not_every_time(tmp_path: Path) -> None:
    holders = {"s": "node-a"}
    async with holding_nodes(tmp_path, holders, "node-a") as (nodes, stub, looked_up):
        for _ in range(5):
            assert await _get(stub, "s") == "node-a"
            assert await _read(stub, "s") == "node-a"
    assert looked_up == ["s"]
    assert nodes["node-a"].calls == ["GetSandbox", "ReadFile"] * 5


@pytest.mark.parametrize("call", [_get, _read])
async def test_a_sandbox_that_moved_is_reached_on_its_new_node(tmp_path: Path, call: Any) -> None:
    holders = {"s": "node-a"}
    async with holding_nodes(tmp_path, holders, "node-a", "node-b") as (nodes, stub, looked_up):
        assert await call(stub, "s") == "node-a"
        # Moved (or deleted and made again on node-b): node-a refuses, the call goes on to B.
        holders["s"] = "node-b"
        assert await call(stub, "s") == "node-b"
        assert await call(stub, "s") == "node-b"
    assert looked_up == ["s", "s"]
    method = nodes["node-a"].calls[0]
    assert nodes["node-a"].calls == [method, method]
    assert nodes["node-b"].calls == [method, method]


async def test_a_sandbox_made_again_elsewhere_as_its_node_found_it_gone_is_reached(
    tmp_path: Path,
) -> None:
    holders = {"s": "node-a"}
    async with holding_nodes(tmp_path, holders, "node-a", "node-b") as (nodes, stub, looked_up):
        assert await _get(stub, "s") == "node-a"
        # Deleted: node-a finds it gone, and as it answers NOT_FOUND it is made on node-b.
        del holders["s"]
        nodes["node-a"].then = lambda: holders.update(s="node-b")
        assert await _get(stub, "s") == "node-b"
    assert looked_up == ["s", "s"]
    assert (nodes["node-a"].calls, nodes["node-b"].calls) == (["GetSandbox"] * 2, ["GetSandbox"])


async def test_a_deleted_sandbox_is_answered_by_its_node_and_looked_up_again_next_time(
    tmp_path: Path,
) -> None:
    holders = {"s": "node-a"}
    async with holding_nodes(tmp_path, holders, "node-a") as (nodes, stub, looked_up):
        assert await _get(stub, "s") == "node-a"
        del holders["s"]
        for _ in range(2):  # the node's answer, not sent again; then any node's
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _get(stub, "s")
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            assert caught.value.details() == f"sandbox {name_of('s')} was deleted"
    assert looked_up == ["s", "s", "s"]
    assert nodes["node-a"].calls == ["GetSandbox"] * 3


async def test_a_call_goes_again_only_once(tmp_path: Path) -> None:
    holders = {"s": "node-a"}
    async with holding_nodes(tmp_path, holders, "node-a", "node-b") as (nodes, stub, _):
        assert await _get(stub, "s") == "node-a"
        # The registry says B, A and B each say the other: B's refusal is the answer.
        holders["s"] = "node-b"
        nodes["node-b"].holders = {"s": "node-a"}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _get(stub, "s")
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "held by node node-a, not this one (node-b)" in (caught.value.details() or "")
    assert (nodes["node-a"].calls, nodes["node-b"].calls) == (["GetSandbox"] * 2, ["GetSandbox"])


async def test_a_remembered_node_that_stopped_answering_is_not_asked_again(
    tmp_path: Path,
) -> None:
    holders = {"s": "node-a"}
    async with holding_nodes(tmp_path, holders, "node-a", "node-b") as (nodes, stub, looked_up):
        assert await _get(stub, "s") == "node-a"
        server = nodes["node-a"].server
        assert server is not None
        await server.stop(None)  # its heartbeats go on: still live to the gateway
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _get(stub, "s")
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        holders["s"] = "node-b"  # taken over by B
        assert await _get(stub, "s") == "node-b"
    assert looked_up == ["s", "s"]


def test_locations_are_forgotten_after_their_time_and_beyond_their_number() -> None:
    now = [0.0]
    locations = Locations(ttl=10.0, size=2, clock=lambda: now[0])
    locations.put(("p", "a"), "node-a")
    locations.put(("p", "b"), "node-b")
    now[0] = 5.0
    locations.put(("p", "a"), "node-c")  # a refresh: now the newest
    locations.put(("p", "c"), "node-c")  # over the number: the oldest (b) goes
    assert [locations.get(("p", s)) for s in "abc"] == ["node-c", None, "node-c"]
    now[0] = 15.5
    assert [locations.get(("p", s)) for s in "abc"] == [None, None, None]
    locations.put(("p", "a"), "node-a")
    locations.forget(("p", "a"))
    assert locations.get(("p", "a")) is None
