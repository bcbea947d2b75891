"""Runs executions through the worker process, one at a time, and keeps a worker alive.

Shutdown ladder for an execution that must stop (timeout or cancelled call), in one place:
SIGINT to the worker (KeyboardInterrupt in user code, namespace kept) → after `kill_grace`,
SIGKILL to the worker's process group (namespace lost, a fresh worker started). The path taken
is reported in the result.
"""

import asyncio
import codecs
import contextlib
import enum
import logging
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration

from executor import workspace
from executor.framing import FrameError, encode, read_frame_async
from executor.stream_cutter import StreamCutter
from executor.workspace import InputStager
from petri.paths import InvalidPath
from petri.v1 import execution_pb2, executor_pb2

# stdlib logging only: the sandbox image carries no packages beyond grpcio and protobuf for us.
log = logging.getLogger("petri.executor")

# Pauses between attempts to start a worker (see _ensure_worker).
WORKER_START_RETRIES = (0.1, 0.3, 1.0, 2.0, 3.0, 4.0, 0.0)
# How long a new worker may take to say it is ready.
WORKER_READY_TIMEOUT = 60.0
# After `done`, how long to wait for the end markers on stdout and stderr (user code may have
# closed those descriptors, in which case the markers never come).
MARKER_WAIT = 1.0
# After the worker died, how long to keep reading output its children may still hold open.
EXIT_DRAIN = 0.5
# Default grace between SIGINT and SIGKILL when the request does not say.
DEFAULT_KILL_GRACE = 3.0
# Pipe buffer per stream: beyond it the worker blocks on write instead of the daemon growing.
STREAM_BUFFER_BYTES = 1 << 16
# Events waiting for the consumer (each at most a pipe buffer or a file chunk).
EMIT_QUEUE_SIZE = 16
# Events that come within this long of the first one waiting go out together, in one message:
# a short execution's output and result then cost one write instead of several. Output of a
# longer one reaches the caller this much later, which nobody watching it will notice.
BATCH_WINDOW = 0.005
# Omitted files listed in a result (the rest are counted in one more entry, with no path and
# the count as its size):
# a result must stay well within gRPC's message limit whatever the code left in /workspace.
MAX_OMITTED_FILES = 1000
# A group stops short of this size, so that messages stay within gRPC's limits (an event
# bigger than this, a large figure say, goes alone, as it would ungrouped).
BATCH_BYTES = 1 << 20


Emit = Callable[[executor_pb2.ExecuteEvent], Awaitable[None]]


class ExecutorBroken(Exception):
    """The executor cannot start a worker: nothing can run in this sandbox."""


@dataclass
class _Stream:
    """One of the worker's output pipes, with what spans executions."""

    name: str
    reader: asyncio.StreamReader
    cutter: StreamCutter = field(default_factory=StreamCutter)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    # Bytes after the previous execution's end marker: output of background threads.
    carry: bytes = b""
    # Bytes forwarded during the current execution.
    emitted: int = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        return self.decoder.decode(data, final)


class WorkerProcess:
    """One worker process and its pipes."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        requests: asyncio.WriteTransport,
        replies: asyncio.StreamReader,
    ) -> None:
        self.process = process
        self.incarnation = secrets.token_hex(6)
        self._requests = requests
        self._preload: asyncio.Task[bool] | None = None
        self.replies = replies
        # Done when the process has exited; executions listen to it instead of each starting
        # a task of their own.
        self.exited: asyncio.Task[int] = asyncio.create_task(process.wait())
        assert process.stdout is not None and process.stderr is not None
        self.stdout = _Stream("stdout", process.stdout)
        self.stderr = _Stream("stderr", process.stderr)

    def __repr__(self) -> str:
        return (
            f"<WorkerProcess pid={self.process.pid} incarnation={self.incarnation}"
            f" returncode={self.process.returncode}>"
        )

    @classmethod
    async def start(
        cls,
        workspace_dir: Path,
        memory_limit: int = 0,
        user: int | None = None,
        process_limit: int = 0,
        preload: Sequence[str] = (),
    ) -> "WorkerProcess":
        """Starts a worker; as `user` (uid = gid, no other groups) when given. It imports the
        `preload` modules after it says it is ready."""
        identity: dict[str, Any] = {}
        if user is not None:
            identity = {"user": user, "group": user, "extra_groups": []}
        loop = asyncio.get_running_loop()
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                # Isolated (-I): no PYTHON* variables, no user site-packages and, above all,
                # not /workspace on sys.path, where user code could plant an `executor`
                # package that skips the limits the worker sets on itself.
                "-I",
                "-u",
                "-m",
                "executor.worker",
                "--requests-fd",
                str(requests_read),
                "--replies-fd",
                str(replies_write),
                "--workspace",
                str(workspace_dir),
                "--memory-limit",
                str(memory_limit),
                "--process-limit",
                str(process_limit),
                "--preload",
                ",".join(preload),
                cwd=workspace_dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(requests_read, replies_write),
                start_new_session=True,  # its own process group, so a kill takes its children
                limit=STREAM_BUFFER_BYTES,
                env=_worker_environment(user),
                **identity,
            )
        except BaseException:
            os.close(requests_write)
            os.close(replies_read)
            raise
        finally:
            os.close(requests_read)
            os.close(replies_write)
        replies = asyncio.StreamReader(limit=STREAM_BUFFER_BYTES)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(replies), os.fdopen(replies_read, "rb", 0)
        )
        requests, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(requests_write, "wb", 0)
        )
        worker = cls(process, requests, replies)
        try:
            payload = await asyncio.wait_for(read_frame_async(replies), WORKER_READY_TIMEOUT)
            ready = payload is not None and executor_pb2.WorkerReply.FromString(payload).ready
            if not ready:
                raise ExecutorBroken("the worker exited before it was ready")
        except (TimeoutError, FrameError, ExecutorBroken):
            await worker.kill()
            raise
        log.info("worker started: pid=%d incarnation=%s", process.pid, worker.incarnation)
        # It preloads now; the first execution waits for that (wait_preloaded), nobody else.
        worker._preload = asyncio.create_task(worker._read_preload_report())
        return worker

    @property
    def preloaded(self) -> bool:
        """The worker has imported the modules it preloads (whether or not each succeeded)."""
        return (
            self._preload is not None
            and self._preload.done()
            and not self._preload.cancelled()
            and self._preload.result()
        )

    async def wait_preloaded(self) -> bool:
        """Waits for the preload to end; False when the worker died or hung during it."""
        if self._preload is None:
            return False
        if self._preload.done():  # every execution but the first
            return self.preloaded
        try:
            return await asyncio.wait_for(asyncio.shield(self._preload), WORKER_READY_TIMEOUT)
        except TimeoutError:
            return False

    async def _read_preload_report(self) -> bool:
        try:
            payload = await read_frame_async(self.replies)
        except FrameError:
            return False
        if payload is None:
            return False
        reply = executor_pb2.WorkerReply.FromString(payload)
        if not reply.HasField("preloaded"):
            return False
        for failure in reply.preloaded.failures:
            log.warning("could not preload %s", failure)
        log.info(
            "worker preloaded in %.2f s", reply.preloaded.duration.ToTimedelta().total_seconds()
        )
        return True

    def send(self, request: executor_pb2.WorkerRequest) -> None:
        self._requests.write(encode(request))

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGINT)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._requests.close()
        await self.process.wait()


_DAEMON_ONLY = frozenset(
    (
        "PETRI_SANDBOX_UID",
        "PETRI_MEMORY_LIMIT",
        "PETRI_PROCESS_LIMIT",
        "PETRI_PRELOAD",
    )
)


def _worker_environment(user: int | None) -> dict[str, str]:
    """The daemon's environment, less what is the daemon's alone (the executor's key above
    all: user code must not be able to call its executor); for another user, the names
    libraries look for (getpass, ~/.cache)."""
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY}
    if user is not None:
        env.update(USER="sandbox", LOGNAME="sandbox", HOME="/tmp")
    return env


class _Phase(enum.Enum):
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # SIGINT sent, waiting for done or the kill deadline
    DRAINING = "draining"  # done received, waiting for the end markers
    EXITED = "exited"  # the worker is gone, reading what output is left


@dataclass
class _Execution:
    request: executor_pb2.ExecuteRequest
    inputs: InputStager | None
    # Bounded: a slow consumer slows the worker down (its pipes fill) instead of the daemon
    # holding everything the code produced.
    queue: "asyncio.Queue[executor_pb2.ExecuteEvent | None]" = field(
        default_factory=lambda: asyncio.Queue(maxsize=EMIT_QUEUE_SIZE)
    )
    # What happens while the code runs (output, the worker's replies, its exit, a cancel),
    # in the order it happens: the one thing _run_locked waits on.
    happenings: "asyncio.Queue[tuple[str, Any]]" = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    async def emit(self, event: executor_pb2.ExecuteEvent) -> None:
        await self.queue.put(event)

    def cancel(self) -> None:
        self.cancelled = True
        self.happenings.put_nowait(("cancel", None))

    async def batches(self) -> AsyncGenerator[list[executor_pb2.ExecuteEvent], None]:
        """The emitted events, grouped: those that come within BATCH_WINDOW of the first of a
        group go with it, up to BATCH_BYTES; a file chunk or a result ends its group."""
        loop = asyncio.get_running_loop()
        carried: executor_pb2.ExecuteEvent | None = None
        while True:
            first = carried if carried is not None else await self.queue.get()
            carried = None
            if first is None:
                return
            batch, size, last = [first], first.ByteSize(), first
            send_at = loop.time() + BATCH_WINDOW
            while not (
                last.HasField("file_chunk") or last.HasField("result") or size >= BATCH_BYTES
            ):
                following: executor_pb2.ExecuteEvent | None
                try:
                    following = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = send_at - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            following = await self.queue.get()
                    except TimeoutError:
                        break
                if following is None:
                    yield batch
                    return
                following_size = following.ByteSize()
                if size + following_size > BATCH_BYTES:
                    carried = following  # it starts the next group
                    break
                batch.append(following)
                size += following_size
                last = following
            yield batch


class Supervisor:
    """Owns the current worker and runs executions through it in arrival order."""

    def __init__(
        self,
        workspace: Path,
        memory_limit: int = 0,
        user: int | None = None,
        process_limit: int = 0,
        preload: Sequence[str] = (),
    ) -> None:
        self.workspace = workspace
        self.memory_limit = memory_limit
        self.user = user
        self.process_limit = process_limit
        self.preload = list(preload)
        self._lock = asyncio.Lock()
        self._worker: WorkerProcess | None = None
        self._drainers: set[asyncio.Task[None]] = set()
        self.execution_count = 0

    def __repr__(self) -> str:
        return f"<Supervisor worker={self._worker!r} executions={self.execution_count}>"

    @property
    def incarnation(self) -> str:
        return self._worker.incarnation if self._worker else ""

    @property
    def preloaded(self) -> bool:
        return self._worker is not None and self._worker.preloaded

    async def start(self) -> None:
        async with self._lock:
            await self._ensure_worker()

    async def close(self) -> None:
        async with self._lock:
            if self._worker is not None:
                await self._worker.kill()
                self._worker = None

    async def _ensure_worker(self) -> WorkerProcess:
        if self._worker is not None and self._worker.process.returncode is None:
            return self._worker
        self._worker = None
        # Right after a kill, the old worker's processes may still count against its uid's
        # process limit until they are reaped: the new one may need a moment.
        for delay in WORKER_START_RETRIES:
            try:
                self._worker = await WorkerProcess.start(
                    self.workspace, self.memory_limit, self.user, self.process_limit, self.preload
                )
                return self._worker
            except (OSError, TimeoutError, FrameError, ExecutorBroken) as exc:
                error = exc
                await asyncio.sleep(delay)
        raise ExecutorBroken(f"cannot start the Python worker: {error}") from error

    async def _preloaded_worker(self) -> WorkerProcess:
        """The worker, once it has preloaded. One that dies or hangs preloading is replaced
        by one that preloads nothing: a module that kills the interpreter on import must not
        make the sandbox unusable."""
        worker = await self._ensure_worker()
        if await worker.wait_preloaded():
            return worker
        log.warning("the worker died or hung while preloading %s; preloading nothing", self.preload)
        await worker.kill()
        self._worker = None
        self.preload = []
        worker = await self._ensure_worker()
        await worker.wait_preloaded()
        return worker

    async def execute(
        self, request: executor_pb2.ExecuteRequest, inputs: InputStager | None = None
    ) -> AsyncGenerator[list[executor_pb2.ExecuteEvent], None]:
        """Puts the staged input files in place, runs the code, and yields output events as
        they come, then the changed files' chunks, then one result; in groups of those that
        come within BATCH_WINDOW of each other.

        Raises InvalidPath or WorkspaceFull, before anything ran, when the inputs cannot be
        put in place. If the consumer goes away, the execution is interrupted (and killed
        after the grace) in the background.
        """
        execution = _Execution(request, inputs)
        task = asyncio.create_task(self._run(execution))
        try:
            async for batch in execution.batches():
                yield batch
            await task  # surfaces ExecutorBroken and input errors
        finally:
            if not task.done():
                execution.cancel()
                drainer = asyncio.create_task(_drain(execution.queue))
                self._drainers.add(drainer)
                drainer.add_done_callback(self._drainers.discard)

    async def _run(self, execution: _Execution) -> None:
        try:
            async with self._lock:
                await self._run_locked(execution)
        finally:
            if execution.inputs is not None:
                execution.inputs.discard()
            await execution.queue.put(None)

    async def _run_locked(self, execution: _Execution) -> None:
        request = execution.request
        if execution.cancelled:
            return  # the caller left while queued: its input files are not written
        if execution.inputs is not None:
            execution.inputs.commit()
        worker = await self._preloaded_worker()  # the timeout starts after the preload
        self.execution_count += 1
        marker = f"\0petri-end-{secrets.token_hex(8)}\0".encode()
        before = workspace.snapshot(self.workspace)
        started = time.monotonic()
        emit = execution.emit
        events = execution.happenings

        worker.send(
            executor_pb2.WorkerRequest(
                code=request.code, execution_count=self.execution_count, end_marker=marker.decode()
            )
        )
        limit = request.max_stream_bytes
        for stream in (worker.stdout, worker.stderr):
            stream.emitted = 0
            carry, stream.carry = stream.carry, b""
            if carry:
                await self._emit_text(stream, carry, emit, limit)
        tasks = [
            asyncio.create_task(_pump_stream(worker.stdout, marker, events)),
            asyncio.create_task(_pump_stream(worker.stderr, marker, events)),
            asyncio.create_task(_pump_replies(worker.replies, events)),
        ]

        def on_exit(exited: "asyncio.Task[int]") -> None:
            events.put_nowait(("exit", exited.result() if not exited.cancelled() else None))

        worker.exited.add_done_callback(on_exit)

        timeout = request.timeout.ToTimedelta().total_seconds() or None
        grace = request.kill_grace.ToTimedelta().total_seconds() or DEFAULT_KILL_GRACE
        phase = _Phase.RUNNING
        deadline = started + timeout if timeout else None
        stop_reason: execution_pb2.ExecutionError.Kind.ValueType | None = None
        done: executor_pb2.WorkerDone | None = None
        ended: set[str] = set()
        killed = False
        protocol_error = ""
        try:
            while not (phase is _Phase.DRAINING and len(ended) == 2):
                if phase is _Phase.EXITED and len(ended) == 2:
                    break
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    kind, payload = await asyncio.wait_for(events.get(), wait)
                except TimeoutError:
                    if phase is _Phase.RUNNING:
                        stop_reason = execution_pb2.ExecutionError.TIMEOUT
                        worker.interrupt()
                        phase, deadline = _Phase.INTERRUPTED, time.monotonic() + grace
                    elif phase is _Phase.INTERRUPTED:
                        killed = True
                        await worker.kill()  # the exit watcher reports it
                        deadline = None
                    else:  # DRAINING or EXITED: stop waiting for what will not come
                        break
                    continue
                if kind in ("stdout", "stderr"):
                    await self._emit_text(getattr(worker, kind), payload, emit, limit)
                elif kind == "end":
                    ended.add(payload)
                elif kind == "output":
                    await emit(executor_pb2.ExecuteEvent(output=payload))
                elif kind == "done":
                    done = payload
                    if phase is not _Phase.EXITED:
                        phase, deadline = _Phase.DRAINING, time.monotonic() + MARKER_WAIT
                elif kind == "protocol_error":
                    protocol_error = payload
                    killed = True
                    await worker.kill()
                elif kind == "exit":
                    phase, deadline = _Phase.EXITED, time.monotonic() + EXIT_DRAIN
                elif kind == "cancel" and phase is _Phase.RUNNING:
                    stop_reason = execution_pb2.ExecutionError.CANCELLED
                    worker.interrupt()
                    phase, deadline = _Phase.INTERRUPTED, time.monotonic() + grace
        finally:
            worker.exited.remove_done_callback(on_exit)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for stream in (worker.stdout, worker.stderr):
            tail = stream.cutter.flush()
            stream.decoder.reset()
            await self._emit_text(stream, tail, emit, limit)

        # Inline, not in a thread: at the process limit no thread can be started.
        pressure = phase is not _Phase.EXITED and _at_process_pressure(
            worker.process.pid, self.process_limit
        )
        if pressure:
            # What the code left running (a fork bomb, typically) holds the sandbox's process
            # limit: stop the interpreter and all of it, or the sandbox stays unusable.
            await worker.kill()
            phase = _Phase.EXITED
            note = (
                "\n[petri: this code left so many processes running that the sandbox reached "
                "half its process limit: the interpreter and every process it started were "
                "stopped; variables are lost, files are kept]\n"
            )
            await emit(executor_pb2.ExecuteEvent(stderr=note))
        reset = phase is _Phase.EXITED
        error: execution_pb2.ExecutionError | None
        if pressure and done is not None and done.HasField("error"):
            error = done.error  # the code's own error says most (BlockingIOError, usually)
        elif pressure:
            error = execution_pb2.ExecutionError(
                kind=execution_pb2.ExecutionError.INTERPRETER_EXITED,
                ename="ProcessLimit",
                evalue=f"the code left too many processes running; {_STATE_LOST}",
            )
        elif reset:
            error = _worker_gone_error(worker, killed, stop_reason, timeout, grace, protocol_error)
        if reset:
            await worker.kill()  # whatever it left running in its process group goes with it
            self._worker = None
            try:
                await self._ensure_worker()
            except ExecutorBroken as exc:  # the next execution tries again
                log.warning("no new worker after a reset: %s", exc)
        if not reset:
            assert done is not None
            error = done.error if done.HasField("error") else None
            if error is not None and stop_reason is not None and error.ename == "KeyboardInterrupt":
                error = _interrupted_error(error, stop_reason, timeout)

        result = executor_pb2.ExecuteResult(
            execution_count=self.execution_count,
            duration=Duration(),
            incarnation=self.incarnation,
            namespace_reset=reset,
        )
        result.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
        if error is not None:
            result.error.CopyFrom(error)
        after = workspace.snapshot(self.workspace)
        problems = workspace.scan_problems(before, after)
        omitted = [
            execution_pb2.OmittedFile(path=problem.path, reason=problem.reason)
            for problem in problems
            if not problem.unlisted
        ]
        omitted += await self._emit_files(workspace.changed_files(before, after), request, emit)
        more = sum(problem.unlisted for problem in problems)
        more += max(0, len(omitted) - MAX_OMITTED_FILES)
        del omitted[MAX_OMITTED_FILES:]
        if more:  # the summary entry: an empty path, and the count in size
            omitted.append(
                execution_pb2.OmittedFile(
                    size=more, reason=f"{more} more omitted entries are not listed"
                )
            )
        result.omitted_files.extend(omitted)
        await emit(executor_pb2.ExecuteEvent(result=result))

    @staticmethod
    async def _emit_text(stream: _Stream, data: bytes, emit: Emit, limit: int) -> None:
        text = stream.decode(data)
        if not text or (limit and stream.emitted > limit):
            return  # past the cap: drained, not forwarded (the controller marks the cut)
        stream.emitted += len(text.encode(errors="replace"))
        await emit(_text_event(stream.name, text))

    async def _emit_files(
        self,
        changes: list[workspace.ChangedFile],
        request: executor_pb2.ExecuteRequest,
        emit: Emit,
    ) -> list[execution_pb2.OmittedFile]:
        """Streams the changed files that fit the request's limits; returns the others."""
        omitted = []
        total = count = 0
        for change in changes:
            reason = change.problem or _over_limits(change.size, request, total, count)
            if reason:
                omitted.append(
                    execution_pb2.OmittedFile(path=change.path, size=change.size, reason=reason)
                )
                continue
            problem = await self._emit_file(change, emit)
            if problem:  # changed under us (a background process)
                omitted.append(
                    execution_pb2.OmittedFile(path=change.path, size=change.size, reason=problem)
                )
                continue
            total += change.size
            count += 1
        return omitted

    async def _emit_file(self, change: workspace.ChangedFile, emit: Emit) -> str:
        """Streams one file; when it cannot be read (to its end), says why: a file begun ends
        with an empty final chunk, so the stream stays well formed."""
        # Look one chunk ahead so the last one carries `final`.
        pending: bytes | None = None
        first = True
        try:
            for data in workspace.read_chunks(self.workspace, change.path, change.size):
                if pending is not None:
                    await emit(_file_event(change, pending, first=first, final=False))
                    first = False
                pending = data
        except (OSError, InvalidPath) as exc:
            if not first:
                await emit(_file_event(change, b"", first=False, final=True))
            return f"could not be read{'' if first else ' to its end'}: {_why(exc)}"
        await emit(_file_event(change, pending or b"", first=first, final=True))
        return ""


def _over_limits(size: int, request: executor_pb2.ExecuteRequest, total: int, count: int) -> str:
    """Why a file of `size` cannot join `count` files of `total` bytes in the response, if so."""
    if request.max_output_files and count >= request.max_output_files:
        return f"more than {request.max_output_files} files were created or changed"
    if total + size > request.max_output_file_bytes:
        return (
            f"the files returned with it would exceed {request.max_output_file_bytes} "
            "bytes, the limit per response"
        )
    return ""


def _why(exc: OSError | InvalidPath) -> str:
    """The error without the path it may quote (the caller has the path already)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)[:200]


async def _drain(queue: "asyncio.Queue[executor_pb2.ExecuteEvent | None]") -> None:
    """Consumes an abandoned execution's events so that it can run to its end."""
    while await queue.get() is not None:
        pass


def _file_event(
    change: workspace.ChangedFile, data: bytes, first: bool, final: bool
) -> executor_pb2.ExecuteEvent:
    chunk = execution_pb2.FileChunk(path=change.path, data=data, final=final)
    if first:
        chunk.size = change.size
    return executor_pb2.ExecuteEvent(file_chunk=chunk)


def _text_event(stream_name: str, text: str) -> executor_pb2.ExecuteEvent:
    if stream_name == "stdout":
        return executor_pb2.ExecuteEvent(stdout=text)
    return executor_pb2.ExecuteEvent(stderr=text)


async def _pump_stream(
    stream: _Stream, marker: bytes, events: "asyncio.Queue[tuple[str, Any]]"
) -> None:
    while True:
        data = await stream.reader.read(STREAM_BUFFER_BYTES)
        if not data:
            events.put_nowait(("end", stream.name))
            return
        before, after = stream.cutter.feed(data, marker)
        if before:
            events.put_nowait((stream.name, before))
        if after is not None:
            stream.carry = after
            events.put_nowait(("end", stream.name))
            return


async def _pump_replies(
    replies: asyncio.StreamReader, events: "asyncio.Queue[tuple[str, Any]]"
) -> None:
    try:
        while True:
            payload = await read_frame_async(replies)
            if payload is None:
                return  # the exit watcher reports the exit
            reply = executor_pb2.WorkerReply.FromString(payload)
            which = reply.WhichOneof("reply")
            if which == "output":
                events.put_nowait(("output", reply.output))
            elif which == "done":
                events.put_nowait(("done", reply.done))
                return
            else:
                raise FrameError(f"unexpected {which!r} reply during an execution")
    except (FrameError, ValueError) as exc:  # ValueError: a payload that is not a WorkerReply
        events.put_nowait(("protocol_error", str(exc)))


def _at_process_pressure(worker_pid: int, process_limit: int) -> bool:
    """Whether the processes user code left in the worker's process group (zombies included:
    they count too) hold half the sandbox's process limit or more: a fork bomb, typically."""
    soft_limit = process_limit or resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return False
    members = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != worker_pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                members += os.getpgid(int(entry)) == worker_pid
    return members >= soft_limit // 2


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


_STATE_LOST = (
    "variables and imports are lost and a fresh interpreter was started; "
    "files in /workspace are kept"
)


def _worker_gone_error(
    worker: WorkerProcess,
    killed: bool,
    stop_reason: "execution_pb2.ExecutionError.Kind.ValueType | None",
    timeout: float | None,
    grace: float,
    protocol_error: str,
) -> execution_pb2.ExecutionError:
    if protocol_error:
        return execution_pb2.ExecutionError(
            kind=execution_pb2.ExecutionError.INTERPRETER_EXITED,
            ename="InterpreterExited",
            evalue=f"the interpreter broke the executor protocol ({protocol_error}) and was "
            f"killed; {_STATE_LOST}",
        )
    if killed and stop_reason == execution_pb2.ExecutionError.TIMEOUT:
        return execution_pb2.ExecutionError(
            kind=execution_pb2.ExecutionError.TIMEOUT,
            ename="TimeoutError",
            evalue=f"the code ran past its {timeout:g} s timeout and did not stop within "
            f"{grace:g} s of an interrupt, so the interpreter was killed; {_STATE_LOST}",
        )
    if killed and stop_reason == execution_pb2.ExecutionError.CANCELLED:
        return execution_pb2.ExecutionError(
            kind=execution_pb2.ExecutionError.CANCELLED,
            ename="CancelledError",
            evalue=f"the call was cancelled and the code did not stop within {grace:g} s of an "
            f"interrupt, so the interpreter was killed; {_STATE_LOST}",
        )
    return execution_pb2.ExecutionError(
        kind=execution_pb2.ExecutionError.INTERPRETER_EXITED,
        ename="InterpreterExited",
        evalue=f"the interpreter {_describe_exit(worker.process.returncode)} during the "
        f"execution; {_STATE_LOST}",
    )


def _interrupted_error(
    error: execution_pb2.ExecutionError,
    stop_reason: "execution_pb2.ExecutionError.Kind.ValueType",
    timeout: float | None,
) -> execution_pb2.ExecutionError:
    if stop_reason == execution_pb2.ExecutionError.TIMEOUT:
        ename = "TimeoutError"
        evalue = (
            f"the code ran past its {timeout:g} s timeout and was interrupted; variables are kept"
        )
    else:
        ename = "CancelledError"
        evalue = "the call was cancelled and the code was interrupted; variables are kept"
    return execution_pb2.ExecutionError(
        kind=stop_reason, ename=ename, evalue=evalue, traceback=error.traceback
    )
