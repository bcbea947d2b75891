"""A call the gateway sent by where it remembered the sandbox is sent again on NOT_FOUND only if
that answer means nothing was done: Pause, Resume and Update do their work and then read the
sandbox again, which is NOT_FOUND if it was deleted meanwhile (and maybe made again on another
node); such a call must not run a second time there."""

from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.errors import NotFound, status_details
from petri.v1 import sandbox_pb2
from tests.unit.gateway.harness import name_of
from tests.unit.gateway.test_locations import HoldingNode, holding_nodes

Context = grpc.aio.ServicerContext[Any, Any]


class WorkingNode(HoldingNode):
    """A HoldingNode whose Pause, Resume and Update do their work, then find the sandbox
    deleted and made again on node b, as a node's final read does in that race."""

    def __init__(self, name: str, holders: dict[str, str]) -> None:
        super().__init__(name, holders)
        self.done: list[str] = []

    async def _work(self, method: str, name: str, context: Context) -> sandbox_pb2.Sandbox:
        self.calls.append(method)
        await self._check(name, context)
        self.done.append(method)
        if self.name == "a":  # deleted and made again on node b after the work was done
            self.holders[name.rpartition("/")[2]] = "b"
            error = NotFound(f"sandbox {name} was deleted", reason="SANDBOX_DELETED")
            await context.abort(error.status, str(error), status_details(error))
        return sandbox_pb2.Sandbox(name=name, display_name=self.name)

    async def PauseSandbox(
        self, request: sandbox_pb2.PauseSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        return await self._work("PauseSandbox", request.name, context)

    async def ResumeSandbox(
        self, request: sandbox_pb2.ResumeSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        return await self._work("ResumeSandbox", request.name, context)

    async def UpdateSandbox(
        self, request: sandbox_pb2.UpdateSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        return await self._work("UpdateSandbox", request.sandbox.name, context)


@pytest.mark.parametrize("method", ["PauseSandbox", "ResumeSandbox", "UpdateSandbox"])
async def test_a_call_that_did_its_work_then_found_the_sandbox_gone_is_not_sent_again(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.unit.gateway.test_locations.HoldingNode", WorkingNode)
    holders = {"s": "a"}
    async with holding_nodes(tmp_path, holders, "a", "b") as (nodes, stub, _):
        await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s")))  # remembered
        if method == "UpdateSandbox":
            request: Any = sandbox_pb2.UpdateSandboxRequest(
                sandbox=sandbox_pb2.Sandbox(name=name_of("s"))
            )
        else:
            request = getattr(sandbox_pb2, f"{method}Request")(name=name_of("s"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, method)(request)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        a, b = nodes["a"], nodes["b"]
        assert isinstance(a, WorkingNode) and isinstance(b, WorkingNode)
        assert (a.done, b.done) == ([method], [])  # once, on the sandbox it was meant for
