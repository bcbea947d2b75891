"""Runs executions through the worker process, one at a time, and keeps a worker alive.

Each execution is an executor.execution.Execution (its phases and the interrupt → kill
ladder); the supervisor owns the worker, orders executions and replaces a worker that is gone.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from executor.execution import EventStream, Execution
from executor.framing import MAX_FRAME_BYTES, FrameError, read_frame_async
from executor.worker_process import ExecutorBroken, WorkerProcess
from executor.workspace import InputStager
from petri.v1 import execution_pb2, executor_pb2

__all__ = ["ExecutorBroken", "SnapshotFailed", "Supervisor"]

# stdlib logging only: the sandbox image carries no packages beyond grpcio and protobuf for us.
log = logging.getLogger("petri.executor")

# Pauses between attempts to start a worker (see _ensure_worker).
WORKER_START_RETRIES = (0.1, 0.3, 1.0, 2.0, 3.0, 4.0, 0.0)
# A saved namespace travels in one frame, with room left for the names that were lost.
MAX_SNAPSHOT_BYTES = MAX_FRAME_BYTES - 16 * 1024 * 1024
# How long a worker may take to save or restore its namespace (user code's __reduce__ runs).
SNAPSHOT_TIMEOUT = 120.0


class SnapshotFailed(Exception):
    """The namespace could not be saved or restored at all (the worker died, hung or sent
    garbage; or the saved namespace is too large). The worker was replaced."""


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

    async def snapshot(self, limit_bytes: int) -> tuple[bytes, list[execution_pb2.LostName]]:
        """The worker's namespace as opaque bytes (a SavedNamespace for a worker to restore;
        never unpickled here), at most `limit_bytes` of values (and MAX_SNAPSHOT_BYTES), and
        the names that could not be saved, each with its reason."""
        limit = MAX_SNAPSHOT_BYTES if limit_bytes <= 0 else min(limit_bytes, MAX_SNAPSHOT_BYTES)
        request = executor_pb2.WorkerSnapshotRequest(
            limit_bytes=limit, execution_count=self.execution_count
        )
        async with self._lock:
            worker = await self._preloaded_worker()
            reply = await self._ask(worker, executor_pb2.WorkerRequest(snapshot=request))
            if not reply.HasField("snapshot"):
                raise await self._failed(worker, "the worker did not send its snapshot")
            return reply.snapshot.saved_namespace, list(reply.snapshot.lost)

    async def restore(self, saved_namespace: bytes) -> list[execution_pb2.LostName]:
        """Restores a snapshot in a new worker (the current one, if it has run nothing yet),
        and the execution count with it; gives the names that could not be restored."""
        if len(saved_namespace) > MAX_SNAPSHOT_BYTES:
            raise SnapshotFailed(f"a saved namespace is at most {MAX_SNAPSHOT_BYTES} bytes")
        request = executor_pb2.WorkerRestoreRequest(saved_namespace=saved_namespace)
        async with self._lock:
            worker = await self._preloaded_worker()
            if worker.used:
                await worker.kill()
                self._worker = None
                worker = await self._preloaded_worker()
            worker.used = True
            reply = await self._ask(worker, executor_pb2.WorkerRequest(restore=request))
            if not reply.HasField("restored"):
                raise await self._failed(worker, "the worker did not say it restored")
            self.execution_count = max(reply.restored.execution_count, 0)
            return list(reply.restored.lost)

    async def _ask(
        self, worker: WorkerProcess, request: executor_pb2.WorkerRequest
    ) -> executor_pb2.WorkerReply:
        """Sends a request that is not an execution and gives the first reply that is not
        output (a display() from a thread the user left running belongs to no one)."""
        worker.send(request)
        try:
            async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                reply = await _next_answer(worker.replies)
        except TimeoutError:
            reason = f"no answer in {SNAPSHOT_TIMEOUT:.0f} s"
        except (FrameError, ValueError) as exc:  # ValueError: not a WorkerReply
            reason = f"a bad reply: {exc}"
        else:
            if reply is not None:
                return reply
            reason = "the worker exited"
        raise await self._failed(worker, reason)

    async def _failed(self, worker: WorkerProcess, reason: str) -> SnapshotFailed:
        """A worker whose answers can no longer be trusted to line up with its requests is
        replaced; the error to raise."""
        log.warning("snapshot or restore failed: %s", reason)
        await self._replace_worker(worker)
        return SnapshotFailed(reason)

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

    @contextlib.asynccontextmanager
    async def execute(
        self, request: executor_pb2.ExecuteRequest, inputs: InputStager | None = None
    ) -> AsyncIterator[EventStream]:
        """Puts the staged input files in place, runs the code, and gives its events as they
        come: output, then the changed files' chunks, then one result.

        On leaving the block after the last event, raises InvalidPath or WorkspaceFull (the
        inputs could not be put in place: nothing ran) or ExecutorBroken. Left before the last
        event, the execution is interrupted (and killed after the grace) in the background.
        """
        execution = Execution(request, inputs, self.workspace, self.process_limit)
        task = asyncio.create_task(self._run(execution))
        try:
            yield execution.events
            if execution.events.ended:
                await task  # surfaces ExecutorBroken and input errors
        finally:
            if not task.done():
                execution.cancel()
                drainer = asyncio.create_task(execution.events.drain())
                self._drainers.add(drainer)
                drainer.add_done_callback(self._drainers.discard)

    async def _run(self, execution: Execution) -> None:
        try:
            async with self._lock:
                await self._run_locked(execution)
        finally:
            if execution.inputs is not None:
                execution.inputs.discard()
            await execution.events.end()

    async def _run_locked(self, execution: Execution) -> None:
        if execution.cancelled:
            return  # the caller left while queued: its input files are not written
        if execution.inputs is not None:
            execution.inputs.commit()
        worker = await self._preloaded_worker()  # the timeout starts after the preload
        self.execution_count += 1
        worker.used = True
        if await execution.run(worker, self.execution_count):
            await self._replace_worker(worker)
        await execution.report(self.execution_count, self.incarnation)

    async def _replace_worker(self, worker: WorkerProcess) -> None:
        """After the namespace was lost: a fresh worker for the next execution."""
        await worker.kill()  # whatever it left running in its process group goes with it
        self._worker = None
        try:
            await self._ensure_worker()
        except ExecutorBroken as exc:  # the next execution tries again
            log.warning("no new worker after a reset: %s", exc)


async def _next_answer(replies: asyncio.StreamReader) -> executor_pb2.WorkerReply | None:
    while True:
        payload = await read_frame_async(replies)
        if payload is None:
            return None
        reply = executor_pb2.WorkerReply.FromString(payload)
        if not reply.HasField("output"):
            return reply
