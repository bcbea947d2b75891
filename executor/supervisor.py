"""Runs executions through the worker process, one at a time, and keeps a worker alive.

Each execution is an executor.execution.Execution (its phases and the interrupt → kill
ladder); the supervisor owns the worker, orders executions and replaces a worker that is gone.
"""

import asyncio
import contextlib
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from executor.execution import EventStream, Execution
from executor.framing import FrameError, read_frame_async
from executor.worker_process import ExecutorBroken, WorkerProcess
from executor.workspace import InputStager
from executor.workspace.archive import Extraction, archive, remove
from petri.protocol import CHECKPOINT_CHUNK_BYTES
from petri.v1 import execution_pb2, executor_pb2

__all__ = ["ExecutorBroken", "NotFresh", "Restoring", "SnapshotFailed", "Supervisor"]

# stdlib logging only: the sandbox image carries no packages beyond grpcio and protobuf for us.
log = logging.getLogger("petri.executor")

# Pauses between attempts to start a worker (see _ensure_worker).
WORKER_START_RETRIES = (0.1, 0.3, 1.0, 2.0, 3.0, 4.0, 0.0)
# How long a worker may take to save or restore its namespace (user code's __reduce__ runs).
SNAPSHOT_TIMEOUT = 120.0


class SnapshotFailed(Exception):
    """The namespace could not be saved or restored at all (the worker died, hung or sent
    garbage). The worker was replaced."""


class NotFresh(Exception):
    """A restore into a sandbox that has run code (or restored a checkpoint) already."""


class Supervisor:
    """Owns the current worker and runs executions through it in arrival order."""

    def __init__(
        self,
        workspace: Path,
        memory_limit: int = 0,
        user: int | None = None,
        process_limit: int = 0,
        preload: Sequence[str] = (),
        preload_grace: float = 0.0,
    ) -> None:
        """`preload_grace`: seconds the first worker waits before preloading, for a first
        execution that would stop it anyway (a cold sandbox's: see worker.preload)."""
        self.workspace = workspace
        self.memory_limit = memory_limit
        self.user = user
        self.process_limit = process_limit
        self.preload = list(preload)
        self.preload_grace = preload_grace
        self._lock = asyncio.Lock()
        self._worker: WorkerProcess | None = None
        # The daemon's first worker: the one a cold sandbox's first execution may hurry.
        self._first_worker: WorkerProcess | None = None
        self._drainers: set[asyncio.Task[None]] = set()
        self.execution_count = 0
        # No code has run since the daemon started, nor was a checkpoint restored: a restore
        # may come.
        self.fresh = True

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

    async def checkpoint(
        self,
        limit_bytes: int,
        send: Callable[[executor_pb2.CheckpointChunk], Awaitable[None]],
    ) -> executor_pb2.CheckpointSummary:
        """Saves the sandbox after the executions queued before it: sends the namespace's
        chunks (opaque bytes, never unpickled here) then the workspace archive's to `send`, and
        gives the summary. The worker and its namespace stay as they were.

        SnapshotFailed when the worker died, hung or misbehaved saving (it was replaced: its
        namespace is gone); ArchiveFailed when the workspace cannot be archived whole. Either
        way what was sent is incomplete and must be dropped."""
        async with self._lock:
            worker = await self._preloaded_worker()
            namespace_bytes, lost = await self._save_namespace(worker, limit_bytes, send)

            async def send_workspace(chunk: bytes) -> None:
                await send(executor_pb2.CheckpointChunk(workspace=chunk))

            workspace_bytes = await archive(self.workspace, self.user, send_workspace)
            return executor_pb2.CheckpointSummary(
                execution_count=self.execution_count,
                lost=lost,
                namespace_bytes=namespace_bytes,
                workspace_bytes=workspace_bytes,
            )

    async def _save_namespace(
        self,
        worker: WorkerProcess,
        limit_bytes: int,
        send: Callable[[executor_pb2.CheckpointChunk], Awaitable[None]],
    ) -> tuple[int, list[execution_pb2.LostName]]:
        """Forwards the worker's namespace chunks as they come; the bytes sent and the names
        lost."""
        worker.send(
            executor_pb2.WorkerRequest(
                snapshot=executor_pb2.WorkerSnapshotRequest(limit_bytes=limit_bytes)
            )
        )
        sent = 0
        # Each reply is read by a task of its own that a cancelled caller does not cancel: a
        # frame read halfway would leave the rest of it to be taken for the next frame.
        reading: asyncio.Task[executor_pb2.WorkerReply] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(self._answer(worker))
                reply = await asyncio.shield(reading)
                reading = None
                if reply.HasField("snapshot"):
                    if reply.snapshot.namespace_bytes != sent:
                        raise await self._failed(worker, "the worker miscounted its snapshot")
                    return sent, list(reply.snapshot.lost)
                if not reply.HasField("namespace_chunk"):
                    raise await self._failed(worker, "the worker did not send its snapshot")
                sent += len(reply.namespace_chunk)
                # The worker stays within the limit: beyond it, it is not our worker's code.
                if len(reply.namespace_chunk) > CHECKPOINT_CHUNK_BYTES or sent > limit_bytes:
                    raise await self._failed(worker, "the worker's snapshot passed its limit")
                await send(executor_pb2.CheckpointChunk(namespace=reply.namespace_chunk))
        except SnapshotFailed:
            raise
        except BaseException:
            # The caller left: the rest of the snapshot is read and dropped, so that the
            # worker's next answers belong to the next request.
            await self._skip_snapshot(worker, reading)
            raise

    async def _skip_snapshot(
        self, worker: WorkerProcess, reading: "asyncio.Task[executor_pb2.WorkerReply] | None"
    ) -> None:
        with contextlib.suppress(SnapshotFailed):
            reply = await reading if reading is not None else await self._answer(worker)
            while not reply.HasField("snapshot"):
                reply = await self._answer(worker)

    @contextlib.asynccontextmanager
    async def restoring(self) -> AsyncIterator["Restoring"]:
        """A restore into this sandbox, after the executions queued before it, which must have
        run nothing yet (NotFresh otherwise). Left without Restoring.finish (an exception),
        what it wrote is undone as far as possible (see Restoring.abandon)."""
        async with self._lock:
            if not self.fresh:
                raise NotFresh("the sandbox has run code or restored a checkpoint already")
            worker = await self._preloaded_worker()
            if worker.used:  # not after a restart (fresh), but a worker is cheap to be sure
                await worker.kill()
                self._worker = None
                worker = await self._preloaded_worker()
            restoring = Restoring(self, worker)
            try:
                yield restoring
            except BaseException:
                await restoring.abandon()
                raise

    async def _ask(
        self, worker: WorkerProcess, request: executor_pb2.WorkerRequest
    ) -> executor_pb2.WorkerReply:
        worker.send(request)
        return await self._answer(worker)

    async def _answer(self, worker: WorkerProcess) -> executor_pb2.WorkerReply:
        """The worker's next reply that is not output (a display() from a thread the user
        left running belongs to no one); SnapshotFailed, the worker replaced, when it dies,
        hangs or sends garbage."""
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
                    self.workspace,
                    self.memory_limit,
                    self.user,
                    self.process_limit,
                    self.preload,
                    # A worker started after a crash preloads at once, as before.
                    self.preload_grace if self._first_worker is None else 0.0,
                )
                if self._first_worker is None:
                    self._first_worker = self._worker
                return self._worker
            except (OSError, TimeoutError, FrameError, ExecutorBroken) as exc:
                error = exc
                await asyncio.sleep(delay)
        raise ExecutorBroken(f"cannot start the Python worker: {error}") from error

    async def wait_preloaded(self) -> bool:
        """Waits until the current worker has preloaded; False when it died or hung doing so."""
        async with self._lock:
            worker = await self._ensure_worker()
            if worker is self._first_worker:
                worker.start_preload()
            return await worker.wait_preloaded()

    async def _preloaded_worker(self, hurry: bool = False) -> WorkerProcess:
        """The worker, once it has preloaded. One that dies or hangs preloading is replaced
        by one that preloads nothing: a module that kills the interpreter on import must not
        make the sandbox unusable. With `hurry` (an execution), the sandbox's first worker
        stops preloading after the module it is importing: a cold sandbox's first execution
        waits for no module it may never use. Pool members have preloaded long before theirs;
        a worker started after a crash preloads in full, as the one it replaces had."""
        worker = await self._ensure_worker()
        if worker is self._first_worker:
            if hurry:
                worker.hurry()
            else:
                worker.start_preload()
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
        self.fresh = False  # from here it may write files: no restore over them
        if execution.inputs is not None:
            execution.inputs.commit()
        worker = await self._preloaded_worker(hurry=True)  # the timeout starts after it
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


class Restoring:
    """One restore in progress (Supervisor.restoring): the namespace's chunks go to the worker
    as they come (it keeps them unread), the workspace's to tar; `finish` then has the worker
    restore the namespace, once the files it may import are in place."""

    def __init__(self, supervisor: Supervisor, worker: WorkerProcess) -> None:
        self._supervisor = supervisor
        self._worker = worker
        self._worker_gone = False
        self._extraction: Extraction | None = None
        workspace = supervisor.workspace
        self._existing = set(os.listdir(workspace))
        self._root = os.stat(workspace)
        self._count_before = supervisor.execution_count

    async def namespace(self, chunk: bytes) -> None:
        if self._worker_gone:  # finish finds it gone and says the namespace is lost
            return
        self._worker.send(_restore_step(chunk=chunk))
        try:
            await self._worker.drain()  # the daemon holds a chunk at a time, not the namespace
        except ConnectionError:
            self._worker_gone = True

    async def workspace(self, chunk: bytes) -> None:
        """InvalidArchive or WorkspaceFull may come here already, or at `finish`."""
        if self._extraction is None:
            self._extraction = await Extraction.start(
                self._supervisor.workspace, self._supervisor.user
            )
        await self._extraction.write(chunk)

    async def finish(self, execution_count: int) -> executor_pb2.RestoreResult:
        """Completes the extraction, restores the namespace in the worker (a new incarnation),
        sets the execution count; the names not restored (all, "*", when the namespace could
        not be read or killed the worker: a new one then starts empty)."""
        if self._extraction is not None:
            await self._extraction.finish()
            self._extraction = None
        supervisor, worker = self._supervisor, self._worker
        worker.used = True
        supervisor.fresh = False
        supervisor.execution_count = execution_count
        try:
            reply = await supervisor._ask(worker, _restore_step(apply=True))
            if not reply.HasField("restored"):
                raise await supervisor._failed(worker, "the worker did not say it restored")
            lost = list(reply.restored.lost)
        except SnapshotFailed as exc:
            lost = [
                execution_pb2.LostName(name="*", reason=f"the namespace was not restored: {exc}")
            ]
        else:
            worker.incarnation = secrets.token_hex(6)  # a new namespace: a new incarnation
        return executor_pb2.RestoreResult(
            incarnation=supervisor.incarnation, execution_count=execution_count, lost=lost
        )

    async def abandon(self) -> None:
        """Undoes a restore that did not finish: the worker drops what it received (or is
        replaced, when it had started to restore), tar is stopped, and what it extracted is
        removed (as user code's uid: what user code could not remove stays)."""
        supervisor = self._supervisor
        supervisor.fresh = True
        supervisor.execution_count = self._count_before
        if self._worker.used:
            await supervisor._replace_worker(self._worker)
        elif not self._worker_gone:
            self._worker.send(_restore_step(discard=True))
        if self._extraction is not None:
            await self._extraction.abort()
        workspace = supervisor.workspace
        with contextlib.suppress(OSError):
            os.chmod(workspace, stat.S_IMODE(self._root.st_mode))
            created = sorted(set(os.listdir(workspace)) - self._existing)
            if created:
                await remove(workspace, created, supervisor.user)
            os.utime(workspace, ns=(self._root.st_atime_ns, self._root.st_mtime_ns))


def _restore_step(
    chunk: bytes | None = None, apply: bool = False, discard: bool = False
) -> executor_pb2.WorkerRequest:
    step = executor_pb2.WorkerRestoreRequest()
    if chunk is not None:
        step.chunk = chunk
    elif apply:
        step.apply = True
    else:
        step.discard = discard
    return executor_pb2.WorkerRequest(restore=step)


async def _next_answer(replies: asyncio.StreamReader) -> executor_pb2.WorkerReply | None:
    while True:
        payload = await read_frame_async(replies)
        if payload is None:
            return None
        reply = executor_pb2.WorkerReply.FromString(payload)
        if not reply.HasField("output"):
            return reply
