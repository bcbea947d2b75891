"""The worker process: the interpreter that holds a sandbox's namespace, its pipes, and the
two signals of the shutdown ladder (SIGINT to it, SIGKILL to its process group)."""

import asyncio
import codecs
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.framing import FrameError, encode, read_frame_async
from executor.stream_cutter import StreamCutter
from petri.v1 import executor_pb2

# stdlib logging only: the sandbox image carries no packages beyond grpcio and protobuf for us.
log = logging.getLogger("petri.executor")

# How long a new worker may take to say it is ready.
WORKER_READY_TIMEOUT = 60.0
# The worker's end of the pipe that tells it to stop preloading (see worker.preload).
HURRY_FD_VARIABLE = "PETRI_HURRY_FD"
# Seconds the first worker of a cold sandbox waits before it preloads (see worker.preload).
PRELOAD_GRACE_VARIABLE = "PETRI_PRELOAD_GRACE"
# Pipe buffer per stream: beyond it the worker blocks on write instead of the daemon growing.
STREAM_BUFFER_BYTES = 1 << 16


class ExecutorBroken(Exception):
    """The executor cannot start a worker: nothing can run in this sandbox."""


@dataclass
class OutputStream:
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
        requests: asyncio.StreamWriter,
        replies: asyncio.StreamReader,
    ) -> None:
        self.process = process
        self.incarnation = secrets.token_hex(6)
        self._requests = requests
        self._preload: asyncio.Task[bool] | None = None
        # Written to (once) to make the worker stop preloading; closed once it has.
        self._hurry: int | None = None
        self.replies = replies
        # It has run code or restored a namespace: a restore needs a new worker.
        self.used = False
        # Done when the process has exited; executions listen to it instead of each starting
        # a task of their own.
        self.exited: asyncio.Task[int] = asyncio.create_task(process.wait())
        assert process.stdout is not None and process.stderr is not None
        self.stdout = OutputStream("stdout", process.stdout)
        self.stderr = OutputStream("stderr", process.stderr)

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
        preload_grace: float = 0.0,
    ) -> "WorkerProcess":
        """Starts a worker; as `user` (uid = gid, no other groups) when given. It imports the
        `preload` modules after it says it is ready, `preload_grace` seconds later unless
        start_preload() or hurry() comes first."""
        identity: dict[str, Any] = {}
        if user is not None:
            identity = {"user": user, "group": user, "extra_groups": []}
        loop = asyncio.get_running_loop()
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        hurry_read, hurry_write = os.pipe()
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
                pass_fds=(requests_read, replies_write, hurry_read),
                start_new_session=True,  # its own process group, so a kill takes its children
                limit=STREAM_BUFFER_BYTES,
                # In the environment, not a flag: a worker of another version ignores it.
                env={
                    **_worker_environment(user),
                    HURRY_FD_VARIABLE: str(hurry_read),
                    **({PRELOAD_GRACE_VARIABLE: f"{preload_grace:g}"} if preload_grace else {}),
                },
                **identity,
            )
        except BaseException:
            os.close(requests_write)
            os.close(replies_read)
            os.close(hurry_write)
            raise
        finally:
            os.close(requests_read)
            os.close(replies_write)
            os.close(hurry_read)
        replies = asyncio.StreamReader(limit=STREAM_BUFFER_BYTES)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(replies), os.fdopen(replies_read, "rb", 0)
        )
        # A stream writer, for drain(): a restore's chunks wait for the worker to read them
        # instead of piling up in the daemon.
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(requests_write, "wb", 0)
        )
        requests = asyncio.StreamWriter(transport, protocol, None, loop)
        worker = cls(process, requests, replies)
        worker._hurry = hurry_write
        try:
            payload = await asyncio.wait_for(read_frame_async(replies), WORKER_READY_TIMEOUT)
            ready = payload is not None and executor_pb2.WorkerReply.FromString(payload).ready
            if not ready:
                said = await _last_words(process)
                raise ExecutorBroken(
                    "the worker exited before it was ready" + (f": {said}" if said else "")
                )
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

    def start_preload(self) -> None:
        """Ends the preload's grace: someone waits for the preload itself (a restore, a
        checkpoint, a file call), not for an execution that could do without it."""
        if self._hurry is not None and not self.preloaded:
            with contextlib.suppress(OSError):  # the worker is gone or has preloaded
                os.write(self._hurry, b"+")

    def hurry(self) -> None:
        """Asks the worker to stop preloading before its next module (the one it is
        importing completes): an execution wants it now, and imports what it needs itself."""
        if self._hurry is not None and not self.preloaded:
            with contextlib.suppress(OSError):  # the worker is gone or has read it already
                os.write(self._hurry, b"!")
            log.info("an execution came before the preload ended: the worker stops preloading")
        self._close_hurry()

    def _close_hurry(self) -> None:
        if self._hurry is not None:
            os.close(self._hurry)
            self._hurry = None

    async def _read_preload_report(self) -> bool:
        try:
            return await self._read_preload_reply()
        finally:
            self._close_hurry()

    async def _read_preload_reply(self) -> bool:
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

    async def drain(self) -> None:
        """Waits until the pipe to the worker has room (ConnectionError when it is gone)."""
        await self._requests.drain()

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGINT)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._requests.close()
        self._close_hurry()
        await self.process.wait()


_DAEMON_ONLY = frozenset(
    (
        "PETRI_SANDBOX_UID",
        "PETRI_MEMORY_LIMIT",
        "PETRI_PROCESS_LIMIT",
        "PETRI_PRELOAD",
        PRELOAD_GRACE_VARIABLE,  # the first worker's alone: passed to it by start()
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


async def _last_words(process: asyncio.subprocess.Process) -> str:
    """The end of what a worker that died starting wrote to stderr (why it could not start:
    a process limit, a broken import), bounded, for the log and the error."""
    if process.stderr is None:
        return ""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            data = await process.stderr.read(STREAM_BUFFER_BYTES)
            return data[-500:].decode(errors="replace").strip()
    return ""
