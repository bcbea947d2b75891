"""The files API outside executions: ListFiles, ReadFile, WriteFile and DeleteFile.

Each call takes its turn in the sandbox's queue (queues.py), behind the executions, pauses and
checkpoints sent before it, resumes a PAUSED sandbox first as an execution does, and needs the
sandbox usable as an execution does (NOT_FOUND when gone, FAILED_PRECONDITION when not RUNNING
or PAUSED). The executor does the work, as user code's uid and never through a symlink; its
statuses become the controller's errors in one place (_file_error).

They do not count against the per-project execute rate limit: they run no code, each is
bounded (by the input limit, the listing's time limit, one file per call) and they queue per
sandbox like executions, so an agent syncing files does not use up its executions.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

from controller.config import Config
from controller.errors import (
    DeadlineExceeded,
    ExecutorFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from controller.names import SandboxName
from controller.quoting import quote
from controller.records import SandboxRecord, State
from controller.runtime.container import ContainerRuntime
from controller.runtime.executor_client import ExecutorClient
from controller.sandboxes.hibernation import Hibernation
from controller.sandboxes.lifecycle import Lifecycle
from controller.sandboxes.lookup import Lookup
from controller.sandboxes.mime_types import guess_mime_type
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.queues import Queues
from controller.store.registry import Registry
from controller.units import format_duration
from petri.v1 import execution_pb2, files_pb2

# How long the executor may take to answer a listing (it stops its own after 10 s) or a
# delete beyond the executor slack; reads and writes go at the caller's pace, and like an
# execution hold the queue at most the longest execution timeout.
LIST_SECONDS = 10.0


class Files:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        containers: ContainerRuntime,
        provisioner: Provisioner,
        lifecycle: Lifecycle,
        lookup: Lookup,
        queues: Queues,
        hibernation: Hibernation,
        clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._registry = registry
        self._containers = containers
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._lookup = lookup
        self._queues = queues
        self._hibernation = hibernation
        self._clock = clock

    def __repr__(self) -> str:
        return f"<Files {self._queues!r}>"

    async def list(
        self, name: SandboxName, request: files_pb2.ListFilesRequest
    ) -> files_pb2.ListFilesResponse:
        """One page of the listing; `request` is checked already (its name ignored)."""
        timeout = LIST_SECONDS + self._config.executor_slack.total_seconds()
        async with self._turn(name) as (record, client):
            try:
                response = await client.list_files(request, timeout)
            except ExecutorFailed as exc:
                raise await self._file_error(record, request.path or ".", exc) from exc
        for info in response.files:
            info.mime_type = (
                guess_mime_type(info.path) if info.type == files_pb2.FileInfo.REGULAR else ""
            )
        return response

    async def read(
        self,
        name: SandboxName,
        path: str,
        send: Callable[[execution_pb2.FileChunk], Awaitable[None]],
    ) -> None:
        """Sends the file's chunks with `send` as the executor sends them (none is held
        here), the first with its size and MIME type, the last marked final."""
        timeout = self._config.max_timeout.total_seconds()
        async with self._turn(name) as (record, client):
            chunks = client.read_file(files_pb2.ReadFileRequest(path=path), timeout)
            size, sent, first, final = 0, 0, True, False
            try:
                # The executor's deadline cannot end a wait in `send` for a caller that
                # stopped taking chunks, which would hold the sandbox's queue for ever.
                async with asyncio.timeout(timeout), contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        # The executor's words are the sandbox's: nothing after the final
                        # chunk, nor beyond the size the first one stated.
                        size = chunk.size if first else size
                        sent += len(chunk.data)
                        if final or sent > size or (chunk.final and sent != size):
                            raise FailedPrecondition(
                                f"{quote(path)} changed while it was read: read it again"
                            )
                        out = execution_pb2.FileChunk(path=path, data=chunk.data)
                        if first:
                            out.size, out.mime_type = size, guess_mime_type(path)
                            first = False
                        out.final = final = chunk.final
                        await send(out)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the read of {quote(path)} took more than the longest execution timeout "
                    f"({format_duration(self._config.max_timeout)}): read it again"
                ) from None
            except ExecutorFailed as exc:
                raise await self._file_error(record, path, exc) from exc
            if not final:
                raise Unavailable(
                    f"the executor of sandbox {record.name} ended the read of {quote(path)} "
                    "before its last chunk: retry"
                )

    async def write(
        self, name: SandboxName, path: str, chunks: AsyncIterator[execution_pb2.FileChunk]
    ) -> files_pb2.FileInfo:
        """Writes the file from `chunks` (checked as they come: a violation raised from them
        cancels the executor's call, which leaves /workspace as it was)."""
        timeout = self._config.max_timeout.total_seconds()
        async with self._turn(name) as (record, client):
            try:
                # The executor's deadline ends its call, not the wait for the caller's next
                # chunk: a caller gone quiet would hold the sandbox's queue for ever.
                async with asyncio.timeout(timeout):
                    info = await client.write_file(chunks, timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the upload of {quote(path)} took more than the longest execution "
                    f"timeout ({format_duration(self._config.max_timeout)}): nothing was written"
                ) from None
            except ExecutorFailed as exc:
                raise await self._file_error(record, path, exc) from exc
        info.path = path
        info.mime_type = guess_mime_type(path)
        return info

    async def delete(self, name: SandboxName, request: files_pb2.DeleteFileRequest) -> None:
        timeout = self._config.max_timeout.total_seconds()
        async with self._turn(name) as (record, client):
            try:
                await client.delete_file(request, timeout)
            except ExecutorFailed as exc:
                raise await self._file_error(record, request.path, exc) from exc

    @contextlib.asynccontextmanager
    async def _turn(self, name: SandboxName) -> AsyncIterator[tuple[SandboxRecord, ExecutorClient]]:
        """The sandbox's queue held, the sandbox RUNNING (resumed if it was PAUSED), and its
        executor's client; the sandbox counts as used when the call went through."""
        record = await self._lookup.held(name)
        _require_usable(record)
        lock = self._queues.of(record.uid)
        queued = lock.locked()
        async with lock:
            # It may have changed while this call waited its turn, or moved to another node.
            if queued or self._queues.moved(record.uid):
                record = await self._lookup.held(name)  # or moved to another node
                _require_usable(record)
            if record.state is State.PAUSED:  # resumed first, as for an execution
                record = await asyncio.shield(self._hibernation.resume_queued(record))
                _require_usable(record)
            yield record, self._provisioner.client_for(record)
            # Use, as an execution is: auto-pause counts from it, and an idle checkpoint
            # older than it is stale (a write or a delete changed the workspace).
            now = self._clock()
            self._registry.set_fields_soon(record.uid, last_active_time=now)

    async def _file_error(
        self, record: SandboxRecord, path: str, failure: ExecutorFailed
    ) -> Exception:
        """The caller's error for a files call the executor ended with `failure`."""
        said = failure.details  # bounded by the client
        if failure.code == "NOT_FOUND":
            return NotFound(
                f"no file {quote(path)} in sandbox {record.name}'s /workspace",
                reason="FILE_NOT_FOUND",
                metadata={"path": path},
            )
        if failure.code == "INVALID_ARGUMENT":
            return InvalidArgument(said)
        if failure.code == "FAILED_PRECONDITION":
            return FailedPrecondition(said)
        if failure.code == "RESOURCE_EXHAUSTED":
            return ResourceExhausted(said)
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is State.DEPROVISIONING:
            return FailedPrecondition(f"sandbox {record.name} was deleted during the call")
        status = await self._containers.status(record.container_name)
        if status is None or not status.running:
            why = (
                "its container is gone" if status is None else f"its container {status.describe()}"
            )
            await self._lifecycle.terminate(current, why)
            return FailedPrecondition(
                f"sandbox {record.name} is TERMINATED: {why}",
                reason="SANDBOX_TERMINATED",
                metadata={"state_message": why},
            )
        # Files calls are idempotent (a write puts the same bytes, a delete finds nothing).
        return Unavailable(
            f"could not reach the executor of sandbox {record.name} ({failure.code}: {said}): retry"
        )


def _require_usable(record: SandboxRecord) -> None:
    if record.state not in (State.RUNNING, State.PAUSED):
        detail = f": {record.state_message}" if record.state_message else ""
        terminated = record.state is State.TERMINATED
        raise FailedPrecondition(
            f"sandbox {record.name} is {record.state.name}{detail}; its files cannot be reached",
            reason="SANDBOX_TERMINATED" if terminated else "",
            metadata={"state_message": record.state_message} if terminated else None,
        )
