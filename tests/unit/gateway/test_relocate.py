"""A call refused by a node because the sandbox moved (a drain: FAILED_PRECONDITION with the
reason SANDBOX_ON_ANOTHER_NODE, before anything was done) is sent once more, to the node the
registry names now; any other refusal, or a second one, reaches the caller as the node said."""

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.errors import FailedPrecondition, status_details
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.unit.gateway.fakes import MemoryNodes, node_record
from tests.unit.gateway.harness import name_of, running_gateway

Context = grpc.aio.ServicerContext[object, object]


class MovingNode(sandbox_pb2_grpc.SandboxServiceServicer):
    """A node that answers GetSandbox with its name, or refuses it as `refusal` says; a refusal
    first moves the sandbox (in `holders`) to `moved_to`."""

    def __init__(self, name: str, holders: dict[str, str], moved_to: str = "") -> None:
        self.name = name
        self.holders = holders
        self.moved_to = moved_to
        self.reason = ""  # the refusal's reason; none: it answers
        self.calls = 0

    async def GetSandbox(
        self, request: sandbox_pb2.GetSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        self.calls += 1
        if not self.reason:
            return sandbox_pb2.Sandbox(name=request.name, display_name=self.name)
        if self.moved_to:
            self.holders[request.name.rpartition("/")[2]] = self.moved_to
        error = FailedPrecondition(
            f"held by {self.moved_to}", reason=self.reason, metadata={"node": self.moved_to}
        )
        await context.abort(error.status, str(error), status_details(error))
        raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def serving(node: MovingNode) -> AsyncIterator[str]:
    server = grpc.aio.server()
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_a_call_refused_because_the_sandbox_moved_goes_to_its_new_node(
    tmp_path: Path,
) -> None:
    holders = {"s": "a"}
    a = MovingNode("a", holders, moved_to="b")  # type: ignore[abstract]
    b = MovingNode("b", holders, moved_to="a")  # type: ignore[abstract]
    async with serving(a) as a_address, serving(b) as b_address:
        nodes = MemoryNodes([node_record("a", a_address), node_record("b", b_address)])
        async with running_gateway(tmp_path, nodes, holders) as (_, stub, _):
            a.reason = "SANDBOX_ON_ANOTHER_NODE"
            got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s")))
            assert got.display_name == "b" and (a.calls, b.calls) == (1, 1)

            # Refused again by the new node: once only, the refusal is the answer.
            b.reason = "SANDBOX_ON_ANOTHER_NODE"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s")))
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert (a.calls, b.calls) == (2, 2)

            # Another FAILED_PRECONDITION is not a move: not sent anywhere else.
            holders["s"] = "a"
            a.reason = "SANDBOX_TERMINATED"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s")))
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert (a.calls, b.calls) == (3, 2)
