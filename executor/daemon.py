"""The executor daemon: serves the Executor gRPC service on the sandbox's unix socket.

It is the wire side: it reads each execution's request and input files off the Session call,
hands them to the supervisor, and groups the events it gets back into messages."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import platform
import signal
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import BrokenExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from executor.batching import batches
from executor.supervisor import ExecutorBroken, NotFresh, Restoring, SnapshotFailed, Supervisor
from executor.workspace import InputStager, InputTooLarge, WorkspaceFull
from executor.workspace.archive import ArchiveFailed, InvalidArchive
from executor.workspace.files import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Changed,
    FileNotFound,
    FileReader,
    FileWriter,
    TooSlow,
    UserThread,
    WrongType,
    decode_page_token,
    delete,
    file_info,
    list_page,
)
from petri.paths import InvalidPath
from petri.protocol import CHECKPOINT_CHUNK_BYTES, EXECUTOR_PROTOCOL
from petri.v1 import execution_pb2, executor_pb2, executor_pb2_grpc, files_pb2

# stdlib logging only: the sandbox image carries no packages beyond grpcio and protobuf for us.
log = logging.getLogger("petri.executor")

# Controller ↔ executor messages carry code and output; keep room for the 100 MB file rule.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


# The call metadata that carries the controller's secret for this executor, and the file in the
# socket directory it comes in (controller.runtime.container.KEY_FILE_NAME).
KEY_METADATA = "petri-executor-key"
KEY_FILE_NAME = "executor.key"


class CallerCheck(grpc.aio.ServerInterceptor):
    """Refuses every call that does not carry this executor's key, before any of its messages
    is read: user code can reach the socket, but not the key (see _take_key)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        given = dict(handler_call_details.invocation_metadata or ()).get(KEY_METADATA, "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._key):
            return await continuation(handler_call_details)
        # A streaming handler whatever the method: a unary one would read the request first.
        return grpc.stream_stream_rpc_method_handler(_refuse)


async def _refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        "only the controller may call this executor (no or wrong petri-executor-key)",
    )


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        # The files API's operations, as user code's uid (the daemon is root in the sandbox).
        self._files = UserThread(supervisor.user)

    def close(self) -> None:
        self._files.close()

    async def Session(
        self,
        request_iterator: AsyncIterator[executor_pb2.ExecuteInput],
        context: grpc.aio.ServicerContext[executor_pb2.ExecuteInput, executor_pb2.ExecuteEvents],
    ) -> AsyncIterator[executor_pb2.ExecuteEvents]:
        # One execution at a time: the controller writes the next request after the last
        # one's result. A cancelled call cancels this generator, which interrupts the code
        # (the supervisor's execute block is left before the result).
        try:
            while (opening := await _next_request(request_iterator, context)) is not None:
                request, inputs_end_here = opening
                stager = await self._receive_inputs(request, request_iterator, inputs_end_here)
                # From here the supervisor owns the staged files: it commits or discards them.
                async with self._supervisor.execute(request, stager) as events:
                    async for batch in batches(events):
                        yield executor_pb2.ExecuteEvents(events=batch)
        except _Incomplete:
            await context.abort(
                grpc.StatusCode.CANCELLED,
                "the inputs ended without end_of_inputs: nothing was written and nothing ran",
            )
        except InvalidPath as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (InputTooLarge, WorkspaceFull) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ExecutorBroken as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _receive_inputs(
        self,
        request: executor_pb2.ExecuteRequest,
        request_iterator: AsyncIterator[executor_pb2.ExecuteInput],
        inputs_end_here: bool,
    ) -> InputStager:
        """Stages the file chunks that follow `request`, up to EndOfInputs (none when the
        request said its inputs end with it); _Incomplete when the call ends before it
        (cancelled or half-closed: nothing is written)."""
        user = self._supervisor.user
        stager = InputStager(
            self._supervisor.workspace,
            request.max_input_bytes,
            owner=(user, user) if user is not None else None,
        )
        if inputs_end_here:
            stager.finish()
            return stager
        try:
            # A cancelled call may look like a half-closed one here (grpc.aio ends the
            # iterator either way): only EndOfInputs says the controller sent everything.
            while (message := await anext(request_iterator, None)) is not None:
                if message.HasField("end_of_inputs"):
                    stager.finish()
                    return stager
                if not message.HasField("file_chunk"):
                    raise InvalidPath("only file chunks may follow the request")
                stager.add(message.file_chunk)
            raise _Incomplete()
        except BaseException:
            stager.discard()
            raise

    # Written with context.write, not as a generator (the stubs type only that): a cancelled
    # call then raises where this waits, and the supervisor cleans up under its lock at once.
    async def Checkpoint(  # type: ignore[override]
        self,
        request: executor_pb2.CheckpointRequest,
        context: grpc.aio.ServicerContext[
            executor_pb2.CheckpointRequest, executor_pb2.CheckpointChunk
        ],
    ) -> None:
        """Saves the sandbox after the executions queued before it (it waits for the one in
        progress): namespace chunks, workspace chunks, then the summary, the last message.
        The worker, its namespace and its incarnation stay as they were.

        INVALID_ARGUMENT without a positive namespace_limit_bytes (nothing is saved).
        FAILED_PRECONDITION when the workspace cannot be archived whole (tar's words say which
        file: e.g. one user code made unreadable). INTERNAL when the worker died, hung or
        misbehaved while saving: it was replaced, so its variables are gone, and a new
        checkpoint would save an empty namespace (do not retry blindly). UNAVAILABLE when no
        worker can be started. On any error no summary is sent: the chunks sent before it
        are an incomplete checkpoint. A call cancelled while the worker saves lets it finish
        (what it sends is dropped), so that the worker keeps its namespace.
        """
        if request.namespace_limit_bytes <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "namespace_limit_bytes must be positive"
            )
        try:
            summary = await self._supervisor.checkpoint(
                request.namespace_limit_bytes, context.write
            )
        except ArchiveFailed as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except SnapshotFailed as exc:
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the worker failed saving its namespace ({exc}): it was replaced, its "
                "variables are gone",
            )
        except ExecutorBroken as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        await context.write(executor_pb2.CheckpointChunk(summary=summary))

    async def Restore(
        self,
        request_iterator: AsyncIterator[executor_pb2.CheckpointChunk],
        context: grpc.aio.ServicerContext[executor_pb2.CheckpointChunk, executor_pb2.RestoreResult],
    ) -> executor_pb2.RestoreResult:
        """Restores a checkpoint, its messages in Checkpoint's order: namespace chunks, then
        workspace chunks, then the summary, then the end of the call. The files are extracted
        as they come (as user code's uid); the namespace's chunks go to the worker, which
        reads them only once the files are in place and the summary came (a new incarnation).

        FAILED_PRECONDITION when the sandbox has run code since the daemon started, or
        restored a checkpoint already (nothing is read). INVALID_ARGUMENT for anything out of
        order, a chunk above CHECKPOINT_CHUNK_BYTES, sizes that differ from the summary's, a
        negative execution count, or an archive tar cannot extract (its words say why);
        RESOURCE_EXHAUSTED when the workspace is full; CANCELLED when the call ends without
        its summary; UNAVAILABLE when no worker can be started. After any of these but the
        first, the restore is undone as far as it can be: the worker drops what it got (it
        was still unused and stays so), tar is stopped and the entries it created at the top
        of the workspace are removed, trees and all (as user code's uid; what that uid cannot
        remove stays), the execution count is put back, and the sandbox may be restored
        again. A cancelled call is undone the same way; one cancelled while the worker
        restores replaces the worker (a new, empty one). A namespace that cannot be read, or
        that kills the worker, is not an error: the result lists it as lost ("*") and a
        fresh worker runs on.
        """
        try:
            async with self._supervisor.restoring() as restoring:
                summary = await _receive_checkpoint(request_iterator, restoring)
                return await restoring.finish(summary.execution_count)
        except NotFresh as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (_Malformed, InvalidArchive) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except WorkspaceFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except _Incomplete:
            await context.abort(
                grpc.StatusCode.CANCELLED,
                "the checkpoint ended without its summary: nothing was restored",
            )
        except ExecutorBroken as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    # --- the files API: the controller runs these between executions ----------------------

    async def ListFiles(
        self,
        request: files_pb2.ListFilesRequest,
        context: grpc.aio.ServicerContext[files_pb2.ListFilesRequest, files_pb2.ListFilesResponse],
    ) -> files_pb2.ListFilesResponse:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < page_size <= MAX_PAGE_SIZE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be 0 to {MAX_PAGE_SIZE}"
            )
        try:
            after = decode_page_token(request.page_token)
            workspace = self._supervisor.workspace
            return await self._files.run(
                list_page, workspace, request.path, request.recursive, page_size, after
            )
        except Exception as exc:
            await _abort_for_file(context, exc)
            raise

    # Written with context.write (as Checkpoint): a cancelled call raises where this waits.
    async def ReadFile(  # type: ignore[override]
        self,
        request: files_pb2.ReadFileRequest,
        context: grpc.aio.ServicerContext[files_pb2.ReadFileRequest, execution_pb2.FileChunk],
    ) -> None:
        """The file's chunks; the last one, marked final, only once the file was read to the
        size the first one states and was seen unchanged (else an error after the chunks)."""
        try:
            reader = await self._files.open(
                FileReader, FileReader.close, self._supervisor.workspace, request.path
            )
        except Exception as exc:
            await _abort_for_file(context, exc)
            raise
        try:
            first = True
            while True:
                data = await self._files.run(reader.next_chunk)
                final = reader.done
                if final:
                    await self._files.run(reader.check_unchanged)
                chunk = execution_pb2.FileChunk(path=request.path, data=data, final=final)
                if first:
                    chunk.size = reader.size
                    first = False
                await context.write(chunk)
                if final:
                    return
        except Exception as exc:
            await _abort_for_file(context, exc)
            raise
        finally:
            self._files.later(reader.close)

    async def WriteFile(
        self,
        request_iterator: AsyncIterator[files_pb2.WriteFileRequest],
        context: grpc.aio.ServicerContext[files_pb2.WriteFileRequest, files_pb2.FileInfo],
    ) -> files_pb2.FileInfo:
        """Stages the chunks beside the target; renames the file into place once the final
        chunk came (the controller sends it only once the caller's upload is complete, as
        EndOfInputs: a cancelled call may look half-closed here). Anything else leaves
        nothing."""
        writer: FileWriter | None = None
        try:
            message = await anext(request_iterator, None)
            if message is None or not message.HasField("chunk"):
                raise InvalidPath("a WriteFile call begins with a chunk")
            path = message.chunk.path
            writer = await self._files.open(
                FileWriter, FileWriter.discard, self._supervisor.workspace, path
            )
            while True:
                if message.chunk.path != path:
                    raise InvalidPath("every chunk of a WriteFile call has the same path")
                if message.chunk.data:
                    await self._files.run(writer.write, message.chunk.data)
                if message.chunk.final:  # the controller sends it last, only when complete
                    return file_info(path, await self._files.run(writer.commit))
                message = await anext(request_iterator, None)
                if message is None:
                    raise _Incomplete()
        except _Incomplete:
            await context.abort(
                grpc.StatusCode.CANCELLED,
                "the file ended without a chunk marked final: nothing was written",
            )
        except Exception as exc:
            await _abort_for_file(context, exc)
            raise
        finally:
            if writer is not None:
                self._files.later(writer.discard)  # after a commit: nothing left to do
        raise AssertionError("unreachable: abort raises")

    async def DeleteFile(
        self,
        request: files_pb2.DeleteFileRequest,
        context: grpc.aio.ServicerContext[files_pb2.DeleteFileRequest, empty_pb2.Empty],
    ) -> empty_pb2.Empty:
        try:
            await self._files.run(
                delete,
                self._supervisor.workspace,
                request.path,
                request.recursive,
                request.allow_missing,
            )
        except Exception as exc:
            await _abort_for_file(context, exc)
            raise
        return empty_pb2.Empty()

    async def GetStatus(
        self,
        request: executor_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            executor_pb2.GetStatusRequest, executor_pb2.ExecutorStatus
        ],
    ) -> executor_pb2.ExecutorStatus:
        return executor_pb2.ExecutorStatus(
            incarnation=self._supervisor.incarnation,
            execution_count=self._supervisor.execution_count,
            python_version=platform.python_version(),
            preloaded=self._supervisor.preloaded,
            protocol=EXECUTOR_PROTOCOL,
        )


async def _abort_for_file(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """Ends a files call with the status files.proto gives `exc`; returns (for the caller to
    re-raise) for anything else."""
    if isinstance(exc, FileNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{str(exc)!r} does not exist")
    if isinstance(exc, InvalidPath):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, (WrongType, Changed)):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, (TooSlow, WorkspaceFull)):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, BrokenExecutor):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "the executor cannot act as user code's uid"
        )
    if isinstance(exc, OSError):  # as user code's uid: what user code could not do either
        what = exc.strerror or type(exc).__name__
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused by the sandbox: {what}")


class _Malformed(Exception):
    """A checkpoint's messages out of order, or inconsistent."""


async def _receive_checkpoint(
    messages: AsyncIterator[executor_pb2.CheckpointChunk], restoring: Restoring
) -> executor_pb2.CheckpointSummary:
    """Forwards a checkpoint's chunks as they come; its summary, once the call ended after it.
    _Malformed for anything out of order; _Incomplete when the call ends before the summary."""
    sizes = {"namespace": 0, "workspace": 0}
    phase = "namespace"
    while (message := await anext(messages, None)) is not None:
        part = message.WhichOneof("part")
        if part == "summary":
            summary = message.summary
            if (summary.namespace_bytes, summary.workspace_bytes) != (
                sizes["namespace"],
                sizes["workspace"],
            ):
                raise _Malformed(
                    f"the checkpoint is not whole: {sizes['namespace']} bytes of namespace and "
                    f"{sizes['workspace']} of workspace came, its summary says "
                    f"{summary.namespace_bytes} and {summary.workspace_bytes}"
                )
            if summary.execution_count < 0:
                raise _Malformed("a checkpoint's execution count is not negative")
            if await anext(messages, None) is not None:
                raise _Malformed("nothing may follow a checkpoint's summary")
            return summary
        if part is None or (part == "namespace" and phase == "workspace"):
            raise _Malformed(
                "a checkpoint is namespace chunks, then workspace chunks, then its summary"
            )
        data: bytes = getattr(message, part)
        if len(data) > CHECKPOINT_CHUNK_BYTES:
            raise _Malformed(f"a checkpoint chunk holds at most {CHECKPOINT_CHUNK_BYTES} bytes")
        sizes[part] += len(data)
        phase = part
        if part == "namespace":
            await restoring.namespace(data)
        else:
            await restoring.workspace(data)
    raise _Incomplete()


class _Incomplete(Exception):
    """An execution's inputs ended without EndOfInputs, or a checkpoint without its summary."""


async def _next_request(
    request_iterator: AsyncIterator[executor_pb2.ExecuteInput],
    context: grpc.aio.ServicerContext[Any, Any],
) -> tuple[executor_pb2.ExecuteRequest, bool] | None:
    """The next execution's request, and whether its inputs end with it; None when the
    controller ended the session."""
    message = await anext(request_iterator, None)
    if message is None:
        return None
    if not message.HasField("request"):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "each execution must begin with its request"
        )
    # Without a timeout an execution could hold the sandbox's queue for ever.
    if message.request.timeout.ToNanoseconds() <= 0:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "an execution needs a positive timeout"
        )
    return message.request, message.inputs_end_here


def _preload_grace(text: str) -> float:
    """The controller's PETRI_PRELOAD_GRACE: seconds, 0 to 10 (anything else: none)."""
    try:
        seconds = float(text)
    except ValueError:
        return 0.0
    return seconds if 0.0 <= seconds <= 10.0 else 0.0


def _take_key(path: Path) -> str:
    """The controller's secret for this sandbox, from a file only we (the sandbox's root) can
    read, removed once read: it then lives in this process alone."""
    try:
        key = path.read_text().strip()
        path.unlink()
    except OSError as exc:
        raise SystemExit(
            f"cannot take the executor's key from {path} ({exc}): refusing to serve a socket "
            "that user code could call"
        ) from None
    if not key:
        raise SystemExit(f"{path} is empty: refusing to serve a socket that user code could call")
    return key


def _prepare_for(user: int | None, socket_path: Path, workspace: Path) -> None:
    """With user code under a uid of its own: /workspace is its, /tmp everyone's, and the
    socket's directory ours alone to write (a host directory: user code must not fill it)."""
    if user is None:
        return
    os.chown(workspace, user, user)
    os.chmod(workspace, 0o755)
    os.chmod("/tmp", 0o1777)
    os.chmod(socket_path.parent, 0o711)
    try:
        _deny_search(socket_path.parent, user)
    except OSError as exc:  # no POSIX ACLs there (gVisor's gofer): the key alone guards
        log.warning("user code can reach the socket (no ACL on its directory: %s)", exc)


# POSIX ACL xattr (linux/posix_acl_xattr.h): a version, then (tag, permissions, id) entries.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF


def _deny_search(directory: Path, user: int) -> None:
    """Denies `user` (user code's uid) the search permission that the directory's mode gives
    everyone else (the controller on the host among them): user code then cannot even connect
    to the socket in it."""
    mode = os.stat(directory).st_mode
    entries = [
        (_ACL_USER_OBJ, (mode >> 6) & 7, _ACL_NO_ID),
        (_ACL_USER, 0, user),
        (_ACL_GROUP_OBJ, (mode >> 3) & 7, _ACL_NO_ID),
        (_ACL_MASK, (mode >> 3) & 7, _ACL_NO_ID),
        (_ACL_OTHER, mode & 7, _ACL_NO_ID),
    ]
    value = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(directory, "system.posix_acl_access", value)


async def run(socket_path: Path, workspace: Path) -> None:
    """Starts the worker, then serves until SIGTERM or SIGINT."""
    key = _take_key(socket_path.parent / KEY_FILE_NAME)
    user_text = os.environ.get("PETRI_WORKER_UID", "")
    user = int(user_text) if user_text and os.geteuid() == 0 else None
    _prepare_for(user, socket_path, workspace)
    supervisor = Supervisor(
        workspace,
        memory_limit=int(os.environ.get("PETRI_MEMORY_LIMIT") or 0),
        user=user,
        process_limit=int(os.environ.get("PETRI_PROCESS_LIMIT") or 0),
        preload=[m for m in os.environ.get("PETRI_PRELOAD", "").split(",") if m],
        preload_grace=_preload_grace(os.environ.get("PETRI_PRELOAD_GRACE", "")),
    )
    await supervisor.start()
    server = grpc.aio.server(
        interceptors=[CallerCheck(key)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    service = ExecutorService(supervisor)
    executor_pb2_grpc.add_ExecutorServicer_to_server(service, server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a socket left by an earlier daemon of this container
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    # The controller on the host is not this container's root (each sandbox has a user
    # namespace of its own): it needs write permission on the socket, which user code then
    # has too. Calls without this sandbox's key are refused (CallerCheck).
    os.chmod(socket_path, 0o666)
    log.info("listening on %s, worker incarnation %s", socket_path, supervisor.incarnation)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("executor stopping")
    await server.stop(grace=1.0)
    service.close()
    await supervisor.close()
