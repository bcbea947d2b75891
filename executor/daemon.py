"""The executor daemon: serves the Executor gRPC service on the sandbox's unix socket."""

import asyncio
import contextlib
import logging
import os
import platform
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from executor.paths import InvalidPath
from executor.supervisor import ExecutorBroken, Supervisor
from executor.workspace import InputStager, InputTooLarge, WorkspaceFull
from petri.v1 import executor_pb2, executor_pb2_grpc

# stdlib logging only: the sandbox image carries no packages beyond grpcio and protobuf for us.
log = logging.getLogger("petri.executor")

# Controller ↔ executor messages carry code and output; keep room for the 100 MB file rule.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, supervisor: Supervisor, sandbox_uid: str) -> None:
        self._supervisor = supervisor
        self._sandbox_uid = sandbox_uid

    async def _check_caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Refuses calls meant for another sandbox (a socket path redirected by a symlink)."""
        if not self._sandbox_uid:
            return
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("petri-sandbox-uid") != self._sandbox_uid:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this executor belongs to another sandbox; the caller's socket path was redirected",
            )

    async def Execute(
        self,
        request_iterator: AsyncIterator[executor_pb2.ExecuteInput],
        context: grpc.aio.ServicerContext[executor_pb2.ExecuteInput, executor_pb2.ExecuteEvent],
    ) -> AsyncIterator[executor_pb2.ExecuteEvent]:
        await self._check_caller(context)
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("request"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the request"
            )
        request = first.request
        user = self._supervisor.user
        stager = InputStager(
            self._supervisor.workspace,
            request.max_input_bytes,
            owner=(user, user) if user is not None else None,
        )
        try:
            try:
                async for message in request_iterator:
                    if not message.HasField("file_chunk"):
                        raise InvalidPath("only file chunks may follow the request")
                    stager.add(message.file_chunk)
                stager.finish()
            except BaseException:
                stager.discard()
                raise
            # From here the supervisor owns the staged files: it commits or discards them.
            async with contextlib.aclosing(self._supervisor.execute(request, stager)) as batches:
                async for batch in batches:
                    for event in batch:
                        yield event
        except InvalidPath as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (InputTooLarge, WorkspaceFull) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ExecutorBroken as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Session(
        self,
        request_iterator: AsyncIterator[executor_pb2.ExecuteRequest],
        context: grpc.aio.ServicerContext[executor_pb2.ExecuteRequest, executor_pb2.ExecuteEvents],
    ) -> AsyncIterator[executor_pb2.ExecuteEvents]:
        await self._check_caller(context)
        # One request at a time: the controller writes the next after the last one's result.
        # A cancelled call cancels this generator, which interrupts the code (execute's close).
        async for request in request_iterator:
            try:
                async with contextlib.aclosing(self._supervisor.execute(request)) as batches:
                    async for batch in batches:
                        yield executor_pb2.ExecuteEvents(events=batch)
            except ExecutorBroken as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def GetStatus(
        self,
        request: executor_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            executor_pb2.GetStatusRequest, executor_pb2.ExecutorStatus
        ],
    ) -> executor_pb2.ExecutorStatus:
        await self._check_caller(context)
        return executor_pb2.ExecutorStatus(
            incarnation=self._supervisor.incarnation,
            execution_count=self._supervisor.execution_count,
            python_version=platform.python_version(),
            preloaded=self._supervisor.preloaded,
            sessions=True,
        )


def _prepare_for(user: int | None, socket_path: Path, workspace: Path) -> None:
    """With user code under a uid of its own: /workspace is its, /tmp everyone's, and the
    socket's directory ours alone to write (a host directory: user code must not fill it)."""
    if user is None:
        return
    os.chown(workspace, user, user)
    os.chmod(workspace, 0o755)
    os.chmod("/tmp", 0o1777)
    os.chmod(socket_path.parent, 0o711)


async def run(socket_path: Path, workspace: Path) -> None:
    """Starts the worker, then serves until SIGTERM or SIGINT."""
    user_text = os.environ.get("PETRI_WORKER_UID", "")
    user = int(user_text) if user_text and os.geteuid() == 0 else None
    _prepare_for(user, socket_path, workspace)
    supervisor = Supervisor(
        workspace,
        memory_limit=int(os.environ.get("PETRI_MEMORY_LIMIT") or 0),
        user=user,
        process_limit=int(os.environ.get("PETRI_PROCESS_LIMIT") or 0),
        preload=[m for m in os.environ.get("PETRI_PRELOAD", "").split(",") if m],
    )
    await supervisor.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    service = ExecutorService(supervisor, os.environ.get("PETRI_SANDBOX_UID", ""))
    executor_pb2_grpc.add_ExecutorServicer_to_server(service, server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a socket left by an earlier daemon of this container
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    # The controller on the host is not this container's root (each sandbox has a user
    # namespace of its own): it needs write permission on the socket. Only it can reach the
    # socket's directory on the host; calls for another sandbox are refused (_check_caller).
    os.chmod(socket_path, 0o666)
    log.info("listening on %s, worker incarnation %s", socket_path, supervisor.incarnation)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("executor stopping")
    await server.stop(grace=1.0)
    await supervisor.close()
