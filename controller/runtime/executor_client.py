"""Channels to the executors inside sandboxes: one per sandbox, opened once and reused."""

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from controller.errors import (
    ExecutorFailed,
    FailedPrecondition,
    InvalidArgument,
    PetriError,
    ResourceExhausted,
    Unavailable,
)
from petri.protocol import EXECUTOR_PROTOCOL
from petri.v1 import execution_pb2, executor_pb2, executor_pb2_grpc, files_pb2

# The call metadata the executor checks (executor.daemon.CallerCheck).
KEY_METADATA = "petri-executor-key"
T = TypeVar("T")
SessionCall = grpc.aio.StreamStreamCall[executor_pb2.ExecuteInput, executor_pb2.ExecuteEvents]
# How often to look for the executor's socket while a sandbox starts.
READY_POLL_INTERVAL = 0.01
STATUS_DEADLINE = 2.0


def _visible(path: Path) -> bool:
    # The directory belongs to the sandbox's root, which opens it to us once it listens.
    try:
        return path.exists()
    except PermissionError:
        return False


class ExecutorClient:
    """Every execution goes through one long-lived Session call, opened on first use and
    again after one is left mid-way or fails. gRPC stays in here: failures come out as the
    controller's errors (controller.errors)."""

    def __init__(self, socket_path: Path, key: str, max_message_bytes: int) -> None:
        self.socket_path = socket_path
        # Sent with every call: the executor refuses calls without its sandbox's key, so
        # neither user code (which can reach the socket) nor a socket path redirected to a
        # neighbour's gets anything done.
        self._metadata = ((KEY_METADATA, key),)
        self._channel = grpc.aio.insecure_channel(
            f"unix:{socket_path}",
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # The socket appears a moment before the executor listens: retry quickly.
                ("grpc.initial_reconnect_backoff_ms", 20),
                ("grpc.min_reconnect_backoff_ms", 20),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._session: SessionCall | None = None
        self._session_busy = False
        # The protocol version the executor reported, once a status call said it.
        self._protocol: int | None = None

    def __repr__(self) -> str:
        state = "none" if self._session is None else "busy" if self._session_busy else "idle"
        return f"<ExecutorClient {self.socket_path} session={state}>"

    async def status(self, timeout: float = STATUS_DEADLINE) -> executor_pb2.ExecutorStatus:
        """The executor's status; ExecutorFailed when it does not answer."""
        try:
            status: executor_pb2.ExecutorStatus = await self._stub.GetStatus(
                executor_pb2.GetStatusRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from exc
        self._protocol = status.protocol
        return status

    async def check_protocol(self) -> None:
        """FailedPrecondition when the executor speaks another protocol than this controller
        (asked once): a sandbox of an image older than its controller (a stale image, or one
        that outlived an upgrade) would refuse every execution as a malformed message. One
        that does not answer is left to the call that follows, which finds out why."""
        if self._protocol is None:
            with contextlib.suppress(ExecutorFailed):
                await self.status()
        if self._protocol is not None and self._protocol != EXECUTOR_PROTOCOL:
            raise FailedPrecondition(
                f"the sandbox's executor speaks protocol version {self._protocol}, this "
                f"controller {EXECUTOR_PROTOCOL}: its image was not built with this controller; "
                "nothing ran. Rebuild the image (sandbox-image/build.sh) and create a new sandbox"
            )

    async def wait_ready(self, timeout: float) -> executor_pb2.ExecutorStatus:
        """Waits until the executor answers; Unavailable after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error = "its socket never appeared"
        while loop.time() < deadline:
            if _visible(self.socket_path):
                remaining = max(0.1, min(STATUS_DEADLINE, deadline - loop.time()))
                try:
                    return await self.status(timeout=remaining)
                except ExecutorFailed as exc:
                    last_error = str(exc)
            await asyncio.sleep(READY_POLL_INTERVAL)
        raise Unavailable(
            f"the sandbox's executor did not become ready in {timeout:g} s ({last_error})"
        )

    async def execute(
        self,
        request: executor_pb2.ExecuteRequest,
        inputs: AsyncIterator[execution_pb2.FileChunk] | None = None,
        sent: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[executor_pb2.ExecuteEvent, None]:
        """Runs one execution and yields its events, up to its result; calls `sent` once the
        request and the inputs are all written: before that, the executor has run nothing and
        will not (an error from `inputs` cancels the call, which then writes nothing). Closing
        the generator before the end interrupts the code.

        Raises InvalidArgument or ResourceExhausted when the executor refused the request or
        its inputs (nothing ran), FailedPrecondition when it speaks another protocol (nothing
        ran), ExecutorFailed when the call ended otherwise without the result, and whatever
        `inputs` raises."""
        await self.check_protocol()
        events = self._in_session(request, inputs, sent)
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    yield event
            except grpc.aio.AioRpcError as exc:
                raise _refusal(exc) or _failure(exc) from exc

    async def checkpoint(
        self, namespace_limit_bytes: int, timeout: float
    ) -> AsyncGenerator[executor_pb2.CheckpointChunk, None]:
        """The executor's checkpoint of its sandbox, message by message, the summary last.
        FailedPrecondition when the executor cannot save every file (its words say which);
        ExecutorFailed when the call ends otherwise without the summary."""
        await self.check_protocol()
        call = self._stub.Checkpoint(
            executor_pb2.CheckpointRequest(namespace_limit_bytes=namespace_limit_bytes),
            timeout=timeout,
            metadata=self._metadata,
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition((exc.details() or "")[:MAX_DETAILS]) from exc
            raise _failure(exc) from exc
        finally:
            call.cancel()

    async def restore(
        self, chunks: AsyncIterator[executor_pb2.CheckpointChunk], timeout: float
    ) -> executor_pb2.RestoreResult:
        """Sends a checkpoint to an executor that has run nothing yet; its answer. Raises
        InvalidArgument or ResourceExhausted when the executor refuses the checkpoint (damaged,
        or its files do not fit: its words say why),
        ExecutorFailed when the call ends otherwise, and whatever `chunks` raises."""
        await self.check_protocol()
        call = self._stub.Restore(timeout=timeout, metadata=self._metadata)
        try:
            first = True
            async for chunk in chunks:
                await _guarded(call, call.write(chunk), first=first)
                first = False
            await _guarded(call, call.done_writing(), first=first)
            result: executor_pb2.RestoreResult = await call
            return result
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) or _failure(exc) from exc
        except BaseException:
            call.cancel()
            raise

    # --- the files API: ExecutorFailed carries the executor's status for the caller to judge

    async def list_files(
        self, request: files_pb2.ListFilesRequest, timeout: float
    ) -> files_pb2.ListFilesResponse:
        await self.check_protocol()
        call = self._stub.ListFiles(request, timeout=timeout, metadata=self._metadata)
        try:
            response: files_pb2.ListFilesResponse = await _unless_closed(call, call)
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from exc
        return response

    async def read_file(
        self, request: files_pb2.ReadFileRequest, timeout: float
    ) -> AsyncGenerator[execution_pb2.FileChunk, None]:
        """The file's chunks as the executor sends them; closing the generator cancels the
        call."""
        await self.check_protocol()
        call = self._stub.ReadFile(request, timeout=timeout, metadata=self._metadata)
        try:
            while (chunk := await _unless_closed(call, call.read())) is not grpc.aio.EOF:
                assert isinstance(chunk, execution_pb2.FileChunk)
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from exc
        finally:
            call.cancel()

    async def write_file(
        self, chunks: AsyncIterator[execution_pb2.FileChunk], timeout: float
    ) -> files_pb2.FileInfo:
        """Sends the chunks (checked already; the last one final), then half-closes: only
        then does the executor put the file in place. Whatever `chunks` raises cancels the
        call first, which leaves nothing written."""
        await self.check_protocol()
        call = self._stub.WriteFile(timeout=timeout, metadata=self._metadata)
        try:
            first = True
            async for chunk in chunks:
                await _guarded(call, call.write(files_pb2.WriteFileRequest(chunk=chunk)), first)
                first = False
            await _guarded(call, call.done_writing(), first=first)
            info: files_pb2.FileInfo = await _unless_closed(call, call)
            return info
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from exc
        except BaseException:
            call.cancel()
            raise

    async def delete_file(self, request: files_pb2.DeleteFileRequest, timeout: float) -> None:
        await self.check_protocol()
        call = self._stub.DeleteFile(request, timeout=timeout, metadata=self._metadata)
        try:
            await _unless_closed(call, call)
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from exc

    def end_idle_session(self) -> None:
        """Ends the session unless an execution is using it: the executor then stops without
        waiting for it (the sandbox is about to be removed)."""
        if self._session is not None and not self._session_busy:
            self._session.cancel()
            self._session = None

    async def _in_session(
        self,
        request: executor_pb2.ExecuteRequest,
        inputs: AsyncIterator[execution_pb2.FileChunk] | None,
        sent: Callable[[], None],
    ) -> AsyncGenerator[executor_pb2.ExecuteEvent, None]:
        session, fresh, shared = self._take_session()
        finished = False
        try:
            await _send(session, request, inputs, fresh)
            sent()
            while not finished:
                batch = await _read(session)
                if not isinstance(batch, executor_pb2.ExecuteEvents):  # EOF
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        "the executor ended its session before the result",
                    )
                for event in batch.events:
                    finished = event.HasField("result")
                    yield event
                    if finished:
                        break  # the result ends the execution: whatever follows is not of it
        finally:
            self._release(session, shared, finished)

    def _take_session(self) -> tuple[SessionCall, bool, bool]:
        """The session for the next execution: (call, whether it is new, whether it is the
        shared one). The manager runs one execution at a time per sandbox; should two
        overlap, the second gets a call of its own, ended with it."""
        shared = not self._session_busy
        session = self._session if shared else None
        if session is not None and not session.done():
            self._session_busy = True
            return session, False, True
        session = self._stub.Session(metadata=self._metadata)
        if shared:
            self._session, self._session_busy = session, True
        return session, True, shared

    def _release(self, session: SessionCall, shared: bool, finished: bool) -> None:
        if shared:
            self._session_busy = False
        if finished and shared:
            return
        # Left mid-way (the caller went away, a timeout, an error, a refused input):
        # cancelling the call interrupts the code or drops the inputs sent so far, and the
        # next execution opens a new session.
        session.cancel()
        if self._session is session:
            self._session = None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close()


_END_OF_INPUTS = executor_pb2.EndOfInputs()
# The executor's words are the sandbox's: pass them on, but bounded.
MAX_DETAILS = 1000


def _refusal(exc: grpc.aio.AioRpcError) -> PetriError | None:
    """The caller's error when the executor refused an execution's request or inputs."""
    details = (exc.details() or "")[:MAX_DETAILS]
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details)
    return None


def _failure(exc: grpc.aio.AioRpcError) -> ExecutorFailed:
    return ExecutorFailed(exc.code().name, (exc.details() or "")[:MAX_DETAILS])


async def _send(
    session: SessionCall,
    request: executor_pb2.ExecuteRequest,
    inputs: AsyncIterator[execution_pb2.FileChunk] | None,
    fresh: bool,
) -> None:
    """Writes one execution's request, its input files and EndOfInputs: all in the request
    when there is no file (a stream of inputs with none in it, as a StreamExecuteCode without
    files sends, included)."""
    write = executor_pb2.ExecuteInput
    first = None if inputs is None else await anext(inputs, None)
    if first is None or inputs is None:  # (`or`: for the type checker)
        await _guarded(session, session.write(write(request=request, inputs_end_here=True)), fresh)
        return
    await _guarded(session, session.write(write(request=request)), first=fresh)
    await _guarded(session, session.write(write(file_chunk=first)))
    async for chunk in inputs:
        await _guarded(session, session.write(write(file_chunk=chunk)))
    # Every input passed its checks: only now may the executor write and run.
    await _guarded(session, session.write(write(end_of_inputs=_END_OF_INPUTS)))


async def _read(session: SessionCall) -> object:
    """The session's next message. A call that ends while the read waits (its channel
    closed: the sandbox is being deleted) raises CancelledError in grpc.aio although we are
    not cancelled: it raises the status the call ended with instead."""
    try:
        return await session.read()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are cancelled, not just the call
    raise await _ended_with(session)


async def _unless_closed(call: grpc.aio.Call, operation: Awaitable[T]) -> T:
    """`operation` on `call`. A call whose channel closes while it waits (the sandbox is being
    deleted) raises CancelledError in grpc.aio although we are not cancelled: left to rise,
    it ended our caller's own call without a status, and that caller waited for ever. It
    raises the status the call ended with instead."""
    try:
        return await operation
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are cancelled, not just the call
    raise await _ended_with(call)


async def _guarded(call: grpc.aio.Call, operation: Awaitable[None], first: bool = False) -> None:
    """A write or half-close on `call`, less two faults of grpc.aio's. The first write of a
    call waits for the call's metadata to go out, forever if the call ends before that
    (cancelled while it connects, as when the sandbox is deleted): it also ends when the call
    does. An operation on a call that ended raises InvalidStateError, a CancelledError or an
    internal error: it raises the status the call ended with."""
    try:
        if not first:
            await operation
            return
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_done(_: object) -> None:
            if not ended.done():
                ended.set_result(None)

        call.add_done_callback(on_done)
        pending = asyncio.ensure_future(operation)
        try:
            await asyncio.wait((pending, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pending.done():
                pending.cancel()  # it waits for metadata that will never go out
        if pending.done() and not pending.cancelled():
            pending.result()
            return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are cancelled, not just the call
    except Exception:  # InvalidStateError, AioRpcError, cygrpc's InternalError
        pass
    raise await _ended_with(call)


async def _ended_with(call: grpc.aio.Call) -> grpc.aio.AioRpcError:
    """The error for a call that ended, or is ending, with its status."""
    try:
        async with asyncio.timeout(STATUS_DEADLINE):
            code, details = await call.code(), await call.details()
    except TimeoutError:
        call.cancel()
        code, details = grpc.StatusCode.UNAVAILABLE, "the executor stopped answering"
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
