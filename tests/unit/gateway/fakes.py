"""Stand-ins for the gateway's tests: petri nodes as small in-process gRPC servers that record
what reaches them, and the membership table in memory."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
from google.protobuf import empty_pb2

from controller.errors import STATUS_DETAILS_KEY, NotFound, PermissionDenied, status_details
from controller.store.nodes import NodeRecord
from petri.v1 import error_details_pb2, execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc

MiB = 1 << 20
CHUNK = b"x" * MiB  # one buffer for every chunk a node sends: the node holds no file
Context = grpc.aio.ServicerContext[Any, Any]


def node_record(
    name: str,
    address: str,
    *,
    draining: bool = False,
    sandboxes: int = 0,
    max_sandboxes: int = 0,
    free_memory: int = 8 << 30,
    warm: Mapping[str, int] | None = None,
    age: timedelta = timedelta(0),
) -> NodeRecord:
    """A node's row as list_nodes reads it, heartbeated `age` ago."""
    return NodeRecord(
        name,
        address,
        datetime.now(UTC) - age,
        draining,
        sandboxes,
        max_sandboxes,
        free_memory,
        dict(warm or {}),
        age,
    )


class MemoryNodes:
    """The membership table, in memory; `failing` makes it raise as a lost database would."""

    def __init__(self, nodes: list[NodeRecord]) -> None:
        self.nodes = nodes
        self.failing = False

    async def list_nodes(self) -> list[NodeRecord]:
        if self.failing:
            raise ConnectionError("the database is not answering")
        return list(self.nodes)

    def update(self, name: str, **fields: Any) -> None:
        self.nodes = [replace(n, **fields) if n.name == name else n for n in self.nodes]


@dataclass
class Seen:
    method: str
    metadata: dict[str, str | bytes]
    time_remaining: float | None


class FakeNode(sandbox_pb2_grpc.SandboxServiceServicer):
    """A node answering what the tests ask, naming itself in its answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.create_status: grpc.StatusCode | None = None
        self.read_chunks = 0
        self.written = 0
        self.execute_started = asyncio.Event()
        self.execute_cancelled = asyncio.Event()
        self.write_refused = asyncio.Event()
        self.write_waiting = asyncio.Event()

    def _saw(self, method: str, context: Context) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.seen.append(Seen(method, metadata, context.time_remaining()))

    def methods(self) -> list[str]:
        return [seen.method for seen in self.seen]

    async def GetSandbox(
        self, request: sandbox_pb2.GetSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        self._saw("GetSandbox", context)
        await context.send_initial_metadata((("x-node-initial", self.name),))
        context.set_trailing_metadata((("x-node", self.name),))
        return sandbox_pb2.Sandbox(name=request.name, display_name=self.name)

    async def CreateSandbox(
        self, request: sandbox_pb2.CreateSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        self._saw("CreateSandbox", context)
        if self.create_status is not None:
            # With the details every error of a real node carries (controller.api.servicer):
            # an UNAVAILABLE without them is the gateway's connection to the node lost.
            message = f"{self.name} cannot create now"
            status = error_details_pb2.Status(code=self.create_status.value[0], message=message)
            await context.abort(
                self.create_status, message, ((STATUS_DETAILS_KEY, status.SerializeToString()),)
            )
        name = f"{request.parent}/sandboxes/{request.sandbox_id or 'sbx'}"
        return sandbox_pb2.Sandbox(name=name, display_name=self.name)

    async def ListSandboxes(
        self, request: sandbox_pb2.ListSandboxesRequest, context: Context
    ) -> sandbox_pb2.ListSandboxesResponse:
        self._saw("ListSandboxes", context)
        return sandbox_pb2.ListSandboxesResponse(next_page_token=self.name)

    async def DeleteSandbox(
        self, request: sandbox_pb2.DeleteSandboxRequest, context: Context
    ) -> empty_pb2.Empty:
        self._saw("DeleteSandbox", context)
        error = NotFound(
            f"sandbox {request.name} was deleted",
            reason="SANDBOX_DELETED",
            metadata={"delete_time": "2026-01-01T00:00:00Z"},
        )
        await context.abort(
            error.status, str(error), (*status_details(error), ("x-node", self.name))
        )
        raise AssertionError("unreachable")

    async def ExecuteCode(
        self, request: sandbox_pb2.ExecuteCodeRequest, context: Context
    ) -> sandbox_pb2.ExecuteCodeResponse:
        self._saw("ExecuteCode", context)
        self.execute_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.execute_cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def ReadFile(
        self, request: files_pb2.ReadFileRequest, context: Context
    ) -> AsyncIterator[execution_pb2.FileChunk]:
        self._saw("ReadFile", context)
        if request.path == "missing":
            error = NotFound("no file missing")
            await context.abort(error.status, str(error), status_details(error))
        count = int(request.path.removesuffix(".bin"))  # "<MiB>.bin"
        await context.send_initial_metadata((("x-node-initial", self.name),))
        for index in range(count):
            self.read_chunks += 1
            yield execution_pb2.FileChunk(path=request.path, data=CHUNK, final=index == count - 1)

    async def WriteFile(
        self, request_iterator: AsyncIterator[files_pb2.WriteFileRequest], context: Context
    ) -> files_pb2.FileInfo:
        self._saw("WriteFile", context)
        request = await anext(request_iterator, None)
        if request is not None and request.chunk.path == "waiting":  # never has its turn
            self.write_waiting.set()
            await asyncio.Event().wait()
        await context.send_initial_metadata((("x-node-initial", self.name),))  # taken
        path = ""
        while request is not None:
            if request.chunk.path == "refused":  # ends the call while the caller still writes
                self.write_refused.set()
                error = PermissionDenied(f"{self.name} refuses the file")
                await context.abort(error.status, str(error), status_details(error))
            path = path or request.chunk.path
            self.written += len(request.chunk.data)
            request = await anext(request_iterator, None)
        return files_pb2.FileInfo(path=path, size=self.written)

    async def StreamExecuteCode(
        self,
        request_iterator: AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest],
        context: Context,
    ) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeResponse]:
        """Answers each message as it comes: `start` with the node's name, each input chunk
        with its path; the result once the caller half-closes."""
        self._saw("StreamExecuteCode", context)
        await context.send_initial_metadata((("x-node-initial", self.name),))
        async for request in request_iterator:
            text = self.name if request.HasField("start") else request.input_chunk.path
            yield sandbox_pb2.StreamExecuteCodeResponse(stdout=text)
        yield sandbox_pb2.StreamExecuteCodeResponse(result=sandbox_pb2.ExecuteCodeResult())


class Outcomes:
    """Notes, on the gateway's channels to the nodes, which streaming calls the gateway
    cancelled (rather than half-closed or finished): a node tells a cancelled request stream
    from a half-closed one only by waiting a moment (controller.api.servicer's
    _check_half_closed), and a cancelled response stream only at its next message."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.ended = 0
        self.changed = asyncio.Event()

    def channel(self, address: str) -> grpc.aio.Channel:
        return cast(grpc.aio.Channel, _NotingChannel(grpc.aio.insecure_channel(address), self))

    def note(self, method: str, call: Any) -> None:
        self.ended += 1
        if call.cancelled():
            self.cancelled.append(method.rsplit("/", 1)[-1])
        self.changed.set()

    async def until_ended(self, count: int) -> None:
        while self.ended < count:
            self.changed.clear()
            await self.changed.wait()


class _NotingChannel:
    """A channel whose streaming calls tell `outcomes` how they ended."""

    def __init__(self, channel: grpc.aio.Channel, outcomes: Outcomes) -> None:
        self._channel = channel
        self._outcomes = outcomes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def _noting(self, method: str, make: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            made = make(*args, **kwargs)
            made.add_done_callback(lambda done: self._outcomes.note(method, done))
            return made

        return call

    def unary_stream(self, method: str) -> Any:
        return self._noting(method, self._channel.unary_stream(method))

    def stream_unary(self, method: str) -> Any:
        return self._noting(method, self._channel.stream_unary(method))

    def stream_stream(self, method: str) -> Any:
        return self._noting(method, self._channel.stream_stream(method))


@contextlib.asynccontextmanager
async def running_node(name: str) -> AsyncIterator[tuple[FakeNode, str]]:
    """A fake node listening on a loopback port: (node, its address)."""
    node = FakeNode(name)  # type: ignore[abstract]  # the others answer UNIMPLEMENTED
    server = grpc.aio.server()
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield node, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
