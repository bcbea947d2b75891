"""A stand-in for the executor daemon: the real gRPC protocol on the sandbox's unix socket, the
real key check, and scripted executions instead of a Python worker. A script may be as hostile
as user code that took over a sandbox: it sends whatever events it likes, in any order.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from controller.runtime.container import KEY_FILE_NAME, SOCKET_NAME
from petri.protocol import EXECUTOR_PROTOCOL
from petri.v1 import execution_pb2, executor_pb2, executor_pb2_grpc, files_pb2

# The call metadata the real daemon checks (executor/daemon.py).
KEY_METADATA = "petri-executor-key"

Event = executor_pb2.ExecuteEvent
Batch = list[executor_pb2.ExecuteEvent]


@dataclass
class Execution:
    """One execution as the stand-in received it."""

    request: executor_pb2.ExecuteRequest
    files: dict[str, bytes]
    execution_count: int
    incarnation: str

    def result(self, **fields: Any) -> Event:
        """The result event an honest executor would send, with `fields` overriding it."""
        values: dict[str, Any] = {
            "execution_count": self.execution_count,
            "incarnation": self.incarnation,
            **fields,
        }
        return Event(result=executor_pb2.ExecuteResult(**values))


# What the stand-in sends for one execution: batches of events (the real daemon's grouping).
Script = Callable[[Execution], AsyncIterator[Batch]]


async def echo(execution: Execution) -> AsyncIterator[Batch]:
    """An honest answer: the code on stdout, then the result."""
    yield [Event(stdout=f"ran {execution.request.code}\n"), execution.result()]


class NoResult(Exception):
    """A script ended without a result: the stand-in ends the call."""


class Refuse(Exception):
    """Raised by a script: the stand-in ends the call with this status, as the daemon does for
    a bad input (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class KeyFileMissing(Exception):
    """The daemon refuses to serve without the controller's key (it exits)."""


class StandInFiles:
    """The files API of StandInExecutor, over its `files` dict, with the daemon's statuses."""

    files: dict[str, bytes]
    file_calls: list[str]
    read_chunks: list[execution_pb2.FileChunk] | None
    write_hold: asyncio.Event | None
    write_received: int

    async def _check_key(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        raise NotImplementedError

    async def ListFiles(
        self, request: files_pb2.ListFilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> files_pb2.ListFilesResponse:
        await self._check_key(context)
        self.file_calls.append("ListFiles")
        prefix = request.path + "/" if request.path else ""
        return files_pb2.ListFilesResponse(
            files=[
                files_pb2.FileInfo(path=path, type=files_pb2.FileInfo.REGULAR, size=len(data))
                for path, data in sorted(self.files.items())
                if path.startswith(prefix)
            ]
        )

    async def ReadFile(
        self, request: files_pb2.ReadFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[execution_pb2.FileChunk]:
        await self._check_key(context)
        self.file_calls.append("ReadFile")
        if self.read_chunks is not None:
            for chunk in self.read_chunks:
                yield chunk
            return
        if request.path not in self.files:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.path!r} does not exist")
        data = self.files[request.path]
        pieces = _thirds(data) or [b""]
        for index, piece in enumerate(pieces):
            yield execution_pb2.FileChunk(
                path=request.path,
                data=piece,
                size=len(data) if index == 0 else 0,
                final=index == len(pieces) - 1,
            )

    async def WriteFile(
        self,
        request_iterator: AsyncIterator[files_pb2.WriteFileRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> files_pb2.FileInfo:
        await self._check_key(context)
        self.file_calls.append("WriteFile")
        data = b""
        path = ""
        async for message in request_iterator:
            self.write_received += 1
            path = message.chunk.path
            data += message.chunk.data
            if self.write_hold is not None:
                await self.write_hold.wait()
            if message.chunk.final:  # as the daemon: in place on the final chunk
                self.files[path] = data
                return files_pb2.FileInfo(
                    path=path, type=files_pb2.FileInfo.REGULAR, size=len(data)
                )
        await context.abort(grpc.StatusCode.CANCELLED, "no final chunk: nothing was written")
        raise AssertionError("unreachable")

    async def DeleteFile(
        self, request: files_pb2.DeleteFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self._check_key(context)
        self.file_calls.append("DeleteFile")
        if self.files.pop(request.path, None) is None and not request.allow_missing:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.path!r} does not exist")
        return empty_pb2.Empty()


class StandInExecutor(StandInFiles, executor_pb2_grpc.ExecutorServicer):
    """Serves one sandbox's socket; runs `scripts[code]` for each execution (echo otherwise)."""

    def __init__(
        self, socket_dir: Path, scripts: dict[str, Script], protocol: int = EXECUTOR_PROTOCOL
    ) -> None:
        self.socket_path = socket_dir / SOCKET_NAME
        self._scripts = scripts
        self.key = _take_key(socket_dir / KEY_FILE_NAME)
        self._server: grpc.aio.Server | None = None
        self.incarnation = secrets.token_hex(16)
        self.executions: list[Execution] = []
        self.refused_calls = 0
        # The protocol version GetStatus reports (0: an image older than the field).
        self.protocol = protocol
        # What Checkpoint sends (a namespace and an archive: opaque bytes, as the real ones are
        # to the controller) and what Restore received; both sides of a pause and a resume.
        self.namespace = b"namespace of " + self.incarnation.encode()
        self.workspace = b"files of " + self.incarnation.encode()
        self.lost: list[execution_pb2.LostName] = []
        self.restore_lost: list[execution_pb2.LostName] = []
        self.restored: tuple[bytes, bytes] | None = None
        self.checkpoints = 0
        # The execution count a restore brought back: this executor's count starts from it.
        self.restored_count = 0
        # While set, Checkpoint fails with this status after its namespace (a worker that died).
        self.checkpoint_failure: grpc.StatusCode | None = None
        # While set, Checkpoint waits for it after its namespace (a save that takes long).
        self.checkpoint_hold: asyncio.Event | None = None
        # While set, Restore refuses with INVALID_ARGUMENT (an archive it cannot extract).
        self.refuse_restore = False
        # The files API's /workspace: regular files by path (the real walk is the executor's,
        # tested on its own); and every files call, by method name, in arrival order.
        self.files: dict[str, bytes] = {}
        self.file_calls: list[str] = []
        # While set, ReadFile sends these chunks instead of the file (a hostile executor).
        self.read_chunks: list[execution_pb2.FileChunk] | None = None
        # While set, WriteFile waits for it after each chunk (a slow disk).
        self.write_hold: asyncio.Event | None = None
        # Chunks WriteFile received so far (committed or not).
        self.write_received = 0

    def __repr__(self) -> str:
        return f"<StandInExecutor {self.socket_path} executions={len(self.executions)}>"

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
        executor_pb2_grpc.add_ExecutorServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Dies: every call in progress ends as a dead process's would."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(None)

    async def _check_key(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Before any message is read, as the daemon's CallerCheck does.
        given = dict(context.invocation_metadata() or ()).get(KEY_METADATA)
        if given != self.key:
            self.refused_calls += 1
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no or wrong executor key")

    async def _run(
        self, request: executor_pb2.ExecuteRequest, files: dict[str, bytes]
    ) -> AsyncIterator[Batch]:
        """The script's batches; NoResult after them when none carried a result."""
        count = self.restored_count + len(self.executions) + 1
        execution = Execution(request, files, count, self.incarnation)
        self.executions.append(execution)
        script = self._scripts.get(request.code, echo)
        answered = False
        async for batch in script(execution):
            answered = answered or any(event.HasField("result") for event in batch)
            yield batch
        if not answered:
            raise NoResult()

    async def Session(
        self,
        request_iterator: AsyncIterator[executor_pb2.ExecuteInput],
        context: grpc.aio.ServicerContext[executor_pb2.ExecuteInput, executor_pb2.ExecuteEvents],
    ) -> AsyncIterator[executor_pb2.ExecuteEvents]:
        """Every execution on one call: a request, its file chunks, EndOfInputs (or a request
        whose inputs end with it), then the script's events; a call that ends before
        EndOfInputs runs nothing."""
        await self._check_key(context)
        request: executor_pb2.ExecuteRequest | None = None
        files: dict[str, bytes] = {}
        try:
            async for message in request_iterator:
                which = message.WhichOneof("input")
                if which == "request" and request is None and message.inputs_end_here:
                    async for batch in self._run(message.request, {}):
                        yield executor_pb2.ExecuteEvents(events=batch)
                elif which == "request" and request is None:
                    request, files = message.request, {}
                elif which == "file_chunk" and request is not None:
                    chunk = message.file_chunk
                    files[chunk.path] = files.get(chunk.path, b"") + chunk.data
                elif which == "end_of_inputs" and request is not None:
                    async for batch in self._run(request, files):
                        yield executor_pb2.ExecuteEvents(events=batch)
                    request = None
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed sequence")
        except NoResult:
            return  # a script without a result ends the call (an executor that gives up)
        except Refuse as refusal:
            await context.abort(refusal.code, refusal.details)

    async def Checkpoint(
        self,
        request: executor_pb2.CheckpointRequest,
        context: grpc.aio.ServicerContext[
            executor_pb2.CheckpointRequest, executor_pb2.CheckpointChunk
        ],
    ) -> AsyncIterator[executor_pb2.CheckpointChunk]:
        """The namespace and the files, each in three chunks or so, then the summary."""
        await self._check_key(context)
        self.checkpoints += 1
        for piece in _thirds(self.namespace):
            yield executor_pb2.CheckpointChunk(namespace=piece)
        if self.checkpoint_hold is not None:
            await self.checkpoint_hold.wait()
        if self.checkpoint_failure is not None:
            await context.abort(self.checkpoint_failure, "the worker died while it saved")
        for piece in _thirds(self.workspace):
            yield executor_pb2.CheckpointChunk(workspace=piece)
        summary = executor_pb2.CheckpointSummary(
            execution_count=self.restored_count + len(self.executions),
            lost=self.lost,
            namespace_bytes=len(self.namespace),
            workspace_bytes=len(self.workspace),
        )
        yield executor_pb2.CheckpointChunk(summary=summary)

    async def Restore(
        self,
        request_iterator: AsyncIterator[executor_pb2.CheckpointChunk],
        context: grpc.aio.ServicerContext[executor_pb2.CheckpointChunk, executor_pb2.RestoreResult],
    ) -> executor_pb2.RestoreResult:
        await self._check_key(context)
        if self.executions:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "code ran here already")
        namespace, workspace = b"", b""
        async for chunk in request_iterator:
            namespace += chunk.namespace
            workspace += chunk.workspace
            if chunk.HasField("summary") and self.refuse_restore:  # as tar refuses, at the end
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the archive is damaged")
            if chunk.HasField("summary"):
                self.restored = (namespace, workspace)
                self.namespace, self.workspace = namespace, workspace
                self.incarnation = secrets.token_hex(16)
                self.restored_count = chunk.summary.execution_count
                return executor_pb2.RestoreResult(
                    incarnation=self.incarnation,
                    execution_count=chunk.summary.execution_count,
                    lost=self.restore_lost,
                )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no summary")
        raise AssertionError("unreachable")

    async def GetStatus(
        self,
        request: executor_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            executor_pb2.GetStatusRequest, executor_pb2.ExecutorStatus
        ],
    ) -> executor_pb2.ExecutorStatus:
        await self._check_key(context)
        return executor_pb2.ExecutorStatus(
            incarnation=self.incarnation,
            execution_count=len(self.executions),
            python_version="3.13.0",
            preloaded=True,
            protocol=self.protocol,
        )


def _thirds(data: bytes) -> list[bytes]:
    size = max(1, -(-len(data) // 3))
    return [data[start : start + size] for start in range(0, len(data), size)]


def _take_key(path: Path) -> str:
    """The controller's secret, read and removed as the daemon does."""
    try:
        key = path.read_text().strip()
        path.unlink()
    except OSError as exc:
        raise KeyFileMissing(f"cannot take the executor's key from {path}: {exc}") from None
    if not key:
        raise KeyFileMissing(f"{path} is empty")
    return key


# --- scripts ---------------------------------------------------------------------------------


@dataclass
class Hang:
    """Never answers; `began` is set once the execution reached the executor, `interrupted`
    once the controller cancelled it (as the real daemon interrupts the code)."""

    began: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, execution: Execution) -> AsyncIterator[Batch]:
        yield [Event(stdout="started\n")]
        self.began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.interrupted.set()
            raise


def sends(*batches: Batch | Callable[[Execution], Batch]) -> Script:
    """A script that sends these batches (or what each function makes of the execution)."""

    async def script(execution: Execution) -> AsyncIterator[Batch]:
        for batch in batches:
            yield batch(execution) if callable(batch) else batch

    return script


def file_chunk(path: str, data: bytes, final: bool = True, size: int | None = None) -> Event:
    chunk = execution_pb2.FileChunk(
        path=path, data=data, final=final, size=len(data) if size is None else size
    )
    return Event(file_chunk=chunk)
