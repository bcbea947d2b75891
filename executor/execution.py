"""One execution on the worker: a method per phase and per rung of the shutdown ladder.

Phases: RUNNING (the code runs) → DRAINING once the worker says done (waiting for the end
markers on stdout and stderr), or EXITED once it is gone (reading what output is left); an
execution that must stop (timeout or cancelled call) goes through INTERRUPTED first.

Shutdown ladder, in one place: SIGINT to the worker (KeyboardInterrupt in user code, namespace
kept) → after `kill_grace`, SIGKILL to the worker's process group (namespace lost, a fresh
worker started). The path taken is reported in the result.
"""

import asyncio
import contextlib
import enum
import os
import resource
import secrets
import time
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf.duration_pb2 import Duration

from executor import outcome, workspace
from executor.file_emission import send_changed_files
from executor.framing import FrameError, read_frame_async
from executor.worker_process import STREAM_BUFFER_BYTES, OutputStream, WorkerProcess
from executor.workspace import InputStager
from petri.v1 import execution_pb2, executor_pb2

# After `done`, how long to wait for the end markers on stdout and stderr (user code may have
# closed those descriptors, in which case the markers never come).
MARKER_WAIT = 1.0
# After the worker died, how long to keep reading output its children may still hold open.
EXIT_DRAIN = 0.5
# Default grace between SIGINT and SIGKILL when the request does not say.
DEFAULT_KILL_GRACE = 3.0
# Events waiting for the consumer (each at most a pipe buffer or a file chunk).
EMIT_QUEUE_SIZE = 16

Event = executor_pb2.ExecuteEvent
StopReason: TypeAlias = "execution_pb2.ExecutionError.Kind.ValueType"
# What happens while the code runs, as (kind, payload): "stdout"/"stderr" (bytes), "end" (the
# stream's name: its end marker came), "output", "done", "protocol_error", "exit", "cancel".
Happenings = asyncio.Queue[tuple[str, Any]]


class EventStream:
    """An execution's events in the order they happen, then None. Bounded: a slow consumer
    slows the worker down (its pipes fill) instead of the daemon holding everything the code
    produced."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=EMIT_QUEUE_SIZE)
        # The consumer has taken the final None: the execution is over.
        self.ended = False

    def __repr__(self) -> str:
        return f"<EventStream waiting={self._queue.qsize()} ended={self.ended}>"

    async def put(self, event: Event) -> None:
        await self._queue.put(event)

    async def end(self) -> None:
        await self._queue.put(None)

    async def get(self) -> Event | None:
        return self._taken(await self._queue.get())

    def get_nowait(self) -> Event | None:
        """The next event if one waits; asyncio.QueueEmpty otherwise."""
        return self._taken(self._queue.get_nowait())

    def _taken(self, event: Event | None) -> Event | None:
        self.ended = self.ended or event is None
        return event

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def drain(self) -> None:
        """Consumes an abandoned execution's events so that it can run to its end."""
        while await self.get() is not None:
            pass


class _Phase(enum.Enum):
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # SIGINT sent, waiting for done or the kill deadline
    DRAINING = "draining"  # done received, waiting for the end markers
    EXITED = "exited"  # the worker is gone, reading what output is left


class Execution:
    """One request: queued, then run on a worker (`run`), then reported (`report`)."""

    def __init__(
        self,
        request: executor_pb2.ExecuteRequest,
        inputs: InputStager | None,
        workspace_dir: Path,
        process_limit: int,
    ) -> None:
        self.request = request
        self.inputs = inputs
        self.events = EventStream()
        self.cancelled = False
        self._workspace = workspace_dir
        self._process_limit = process_limit
        # What happens while the code runs, in the order it happens: the one thing _watch
        # waits on.
        self._happenings: Happenings = asyncio.Queue()
        self._timeout = request.timeout.ToTimedelta().total_seconds() or None
        self._grace = request.kill_grace.ToTimedelta().total_seconds() or DEFAULT_KILL_GRACE
        self._worker: WorkerProcess | None = None
        self._phase = _Phase.RUNNING
        self._deadline: float | None = None
        self._stop_reason: StopReason | None = None
        self._done: executor_pb2.WorkerDone | None = None
        self._ended: set[str] = set()
        self._killed = False
        self._protocol_error = ""
        self._pressure = False
        self._started = 0.0
        self._before = workspace.Snapshot()

    def __repr__(self) -> str:
        return f"<Execution phase={self._phase.value} cancelled={self.cancelled}>"

    @property
    def worker(self) -> WorkerProcess:
        assert self._worker is not None, "the execution has not started"
        return self._worker

    def cancel(self) -> None:
        """The caller went away: interrupt the code (or, queued, never run it)."""
        self.cancelled = True
        self._happenings.put_nowait(("cancel", None))

    # --- phases ---------------------------------------------------------------------------

    async def run(self, worker: WorkerProcess, execution_count: int) -> bool:
        """Runs the code on `worker` until it is done, stopped or gone, forwarding its output.
        True when the namespace is lost: the worker exited or was killed (the caller then
        replaces it) before `report`."""
        self._worker = worker
        self._before = workspace.snapshot(self._workspace)
        self._started = time.monotonic()
        marker = f"\0petri-end-{secrets.token_hex(8)}\0".encode()
        worker.send(
            executor_pb2.WorkerRequest(
                code=self.request.code, execution_count=execution_count, end_marker=marker.decode()
            )
        )
        await self._forward_carried_output()
        pumps = [
            asyncio.create_task(_pump_stream(worker.stdout, marker, self._happenings)),
            asyncio.create_task(_pump_stream(worker.stderr, marker, self._happenings)),
            asyncio.create_task(_pump_replies(worker.replies, self._happenings)),
        ]
        worker.exited.add_done_callback(self._on_exit)
        if self._timeout:
            self._deadline = self._started + self._timeout
        try:
            await self._watch()
        finally:
            worker.exited.remove_done_callback(self._on_exit)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        await self._flush_streams()
        await self._relieve_process_pressure()
        return self._phase is _Phase.EXITED

    async def _watch(self) -> None:
        """Handles what happens, in order, until the worker said done (or is gone) and both
        streams reached their end, or there is nothing more worth waiting for."""
        while not (self._phase in (_Phase.DRAINING, _Phase.EXITED) and len(self._ended) == 2):
            wait = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            try:
                kind, payload = await asyncio.wait_for(self._happenings.get(), wait)
            except TimeoutError:
                if not await self._deadline_passed():
                    return
                continue
            await self._handle(kind, payload)

    async def _handle(self, kind: str, payload: Any) -> None:
        if kind in ("stdout", "stderr"):
            stream = self.worker.stdout if kind == "stdout" else self.worker.stderr
            await self._forward_text(stream, payload)
        elif kind == "end":
            self._ended.add(payload)
        elif kind == "output":
            await self.events.put(Event(output=payload))
        elif kind == "done":
            self._done = payload
            if self._phase is not _Phase.EXITED:
                self._phase, self._deadline = _Phase.DRAINING, time.monotonic() + MARKER_WAIT
        elif kind == "protocol_error":
            self._protocol_error = payload
            await self._kill()
        elif kind == "exit":
            self._phase, self._deadline = _Phase.EXITED, time.monotonic() + EXIT_DRAIN
        elif kind == "cancel" and self._phase is _Phase.RUNNING:
            self._interrupt(execution_pb2.ExecutionError.CANCELLED)

    def _on_exit(self, exited: "asyncio.Task[int]") -> None:
        self._happenings.put_nowait(("exit", exited.result() if not exited.cancelled() else None))

    async def _deadline_passed(self) -> bool:
        """Takes the next rung of the ladder; False when there is none left to wait for."""
        if self._phase is _Phase.RUNNING:
            self._interrupt(execution_pb2.ExecutionError.TIMEOUT)
        elif self._phase is _Phase.INTERRUPTED:
            await self._kill()
            self._deadline = None
        else:  # DRAINING or EXITED: stop waiting for what will not come
            return False
        return True

    async def _flush_streams(self) -> None:
        """Forwards what the streams held back (a partial marker, an incomplete character)."""
        for stream in (self.worker.stdout, self.worker.stderr):
            tail = stream.cutter.flush()
            stream.decoder.reset()
            await self._forward_text(stream, tail)

    async def _relieve_process_pressure(self) -> None:
        """Kills a worker whose code left so many processes running (a fork bomb, typically)
        that they hold half the sandbox's process limit: else the sandbox stays unusable."""
        # Inline, not in a thread: at the process limit no thread can be started.
        if self._phase is _Phase.EXITED or not at_process_pressure(
            self.worker.process.pid, self._process_limit
        ):
            return
        await self.worker.kill()
        self._phase = _Phase.EXITED
        self._pressure = True
        await self.events.put(Event(stderr=outcome.PROCESS_PRESSURE_NOTE))

    async def report(self, execution_count: int, incarnation: str) -> None:
        """Sends the files the code created or changed, then the result (the last event);
        `incarnation`: the worker that holds the namespace now."""
        result = executor_pb2.ExecuteResult(
            execution_count=execution_count,
            duration=Duration(),
            incarnation=incarnation,
            namespace_reset=self._phase is _Phase.EXITED,
        )
        result.duration.FromNanoseconds(int((time.monotonic() - self._started) * 1e9))
        error = self._error()
        if error is not None:
            result.error.CopyFrom(error)
        after = workspace.snapshot(self._workspace)
        problems = workspace.scan_problems(self._before, after)
        changes = workspace.changed_files(self._before, after)
        unsent = await send_changed_files(self._workspace, changes, self.request, self.events.put)
        result.omitted_files.extend(outcome.omitted_files(problems, unsent))
        await self.events.put(Event(result=result))

    def _error(self) -> execution_pb2.ExecutionError | None:
        """The result's error: the code's own, or why the worker stopped."""
        done = self._done
        if self._pressure:
            if done is not None and done.HasField("error"):
                return done.error  # the code's own error says most (BlockingIOError, usually)
            return outcome.process_limit_error()
        if self._phase is _Phase.EXITED:
            return outcome.worker_gone_error(
                self.worker.process.returncode,
                self._killed,
                self._stop_reason,
                self._timeout,
                self._grace,
                self._protocol_error,
            )
        assert done is not None  # DRAINING: the worker said done
        error = done.error if done.HasField("error") else None
        if (
            error is not None
            and self._stop_reason is not None
            and error.ename == "KeyboardInterrupt"
        ):
            return outcome.interrupted_error(error, self._stop_reason, self._timeout)
        return error

    # --- the ladder -----------------------------------------------------------------------

    def _interrupt(self, reason: StopReason) -> None:
        """First rung: SIGINT, KeyboardInterrupt in the code; the kill follows after the grace."""
        self._stop_reason = reason
        self.worker.interrupt()
        self._phase, self._deadline = _Phase.INTERRUPTED, time.monotonic() + self._grace

    async def _kill(self) -> None:
        """Last rung: SIGKILL to the worker's process group (the exit watcher reports it)."""
        self._killed = True
        await self.worker.kill()

    # --- output ---------------------------------------------------------------------------

    async def _forward_carried_output(self) -> None:
        """Starts the streams' count afresh and forwards what background threads wrote after
        the previous execution's end marker."""
        for stream in (self.worker.stdout, self.worker.stderr):
            stream.emitted = 0
            carry, stream.carry = stream.carry, b""
            if carry:
                await self._forward_text(stream, carry)

    async def _forward_text(self, stream: OutputStream, data: bytes) -> None:
        text = stream.decode(data)
        limit = self.request.max_stream_bytes
        if not text or (limit and stream.emitted > limit):
            return  # past the cap: drained, not forwarded (the controller marks the cut)
        stream.emitted += len(text.encode(errors="replace"))
        if stream.name == "stdout":
            await self.events.put(Event(stdout=text))
        else:
            await self.events.put(Event(stderr=text))


async def _pump_stream(stream: OutputStream, marker: bytes, happenings: Happenings) -> None:
    while True:
        data = await stream.reader.read(STREAM_BUFFER_BYTES)
        if not data:
            happenings.put_nowait(("end", stream.name))
            return
        before, after = stream.cutter.feed(data, marker)
        if before:
            happenings.put_nowait((stream.name, before))
        if after is not None:
            stream.carry = after
            happenings.put_nowait(("end", stream.name))
            return


async def _pump_replies(replies: asyncio.StreamReader, happenings: Happenings) -> None:
    try:
        while True:
            payload = await read_frame_async(replies)
            if payload is None:
                return  # the exit watcher reports the exit
            reply = executor_pb2.WorkerReply.FromString(payload)
            which = reply.WhichOneof("reply")
            if which == "output":
                happenings.put_nowait(("output", reply.output))
            elif which == "done":
                happenings.put_nowait(("done", reply.done))
                return
            else:
                raise FrameError(f"unexpected {which!r} reply during an execution")
    except (FrameError, ValueError) as exc:  # ValueError: a payload that is not a WorkerReply
        happenings.put_nowait(("protocol_error", str(exc)))


def at_process_pressure(worker_pid: int, process_limit: int) -> bool:
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
