"""The worker: holds the user's namespace and runs code in it, one request at a time.

Started by the daemon as `python -u -m executor.worker --requests-fd R --replies-fd W`, with
stdin on /dev/null and stdout/stderr on pipes the daemon reads. Requests and replies are frames
(:mod:`executor.framing`) on two private pipes. After each execution the worker writes the
request's end marker to fd 1 and fd 2, then sends `done`, so the daemon can tell where this
execution's output ends even when subprocesses or C code wrote to those descriptors directly.

SIGINT interrupts user code (KeyboardInterrupt) and is ignored between executions.
"""

import argparse
import ast
import builtins
import contextlib
import ctypes
import fcntl
import importlib
import io
import linecache
import os
import resource
import select
import shutil
import signal
import stat
import struct
import sys
import termios
import threading
import time
import traceback
from types import FrameType, TracebackType
from typing import Any

from executor import formatting, namespace_snapshot
from executor.framing import read_frame, write_frame
from petri.v1 import execution_pb2, executor_pb2

# Frames to the daemon are at most 64 MiB (framing.MAX_FRAME_BYTES): stay well below.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
# Where the image build leaves matplotlib's font list (sandbox-image/Containerfile).
BUILT_MATPLOTLIB_CACHE = "/opt/petri/matplotlib"
MAX_EVALUE_CHARS = 64 * 1024
MAX_TRACEBACK_LINE_CHARS = 8 * 1024
MAX_TRACEBACK_LINES = 400
# How long an output waits at most for the daemon to read the text printed before it (a
# flood of prints from a thread the code left running must not hold it back for long).
OUTPUT_ORDER_WAIT = 0.2


class Worker:
    def __init__(self, replies_fd: int) -> None:
        self._replies_fd = replies_fd
        self._in_user_code = False
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        # Figures already shown in this cell (display(fig), or fig as the value), by id.
        self._shown_figures: set[int] = set()
        self._send_lock = threading.Lock()
        self._pid = os.getpid()

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._in_user_code:
            raise KeyboardInterrupt

    def send(self, reply: executor_pb2.WorkerReply) -> None:
        # One frame at a time (display() may be called from threads), and never cut by a
        # KeyboardInterrupt half-way: a torn frame would cost the namespace.
        with self._send_lock:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                write_frame(self._replies_fd, reply)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def send_namespace_chunk(self, chunk: bytes) -> None:
        if os.getpid() != self._pid:  # a child forked by a __reduce__ must not speak for us
            os._exit(1)
        self.send(executor_pb2.WorkerReply(namespace_chunk=chunk))

    def display(self, *objs: Any) -> None:
        """Shows objects as rich outputs, like IPython's display()."""
        for obj in objs:
            self._send_output(obj, execution_pb2.Output.DISPLAY)

    def _send_output(self, obj: Any, kind: "execution_pb2.Output.Kind.ValueType") -> None:
        if formatting.is_figure(obj):
            self._shown_figures.add(id(obj))
        output = formatting.bounded(formatting.to_output(obj, kind), MAX_OUTPUT_BYTES)
        _wait_output_taken()
        self.send(executor_pb2.WorkerReply(output=output))

    def show_open_figures(self) -> None:
        """Shows the matplotlib figures left open by the cell, then closes them, as a notebook's
        inline backend does."""
        shown, self._shown_figures = self._shown_figures, set()
        if "matplotlib.pyplot" not in sys.modules:
            return
        try:
            from matplotlib import pyplot
            from matplotlib._pylab_helpers import Gcf

            figures = [manager.canvas.figure for manager in Gcf.get_all_fig_managers()]
            for figure in figures:
                if id(figure) not in shown:
                    self._send_output(figure, execution_pb2.Output.DISPLAY)
            pyplot.close("all")
        except Exception as exc:  # the user's matplotlib state is the user's
            print(f"[petri] could not render open figures: {exc!r}", file=sys.stderr)

    def run(self, request: executor_pb2.WorkerRequest) -> executor_pb2.WorkerDone:
        # User code may have replaced the handler in an earlier cell; interrupts must work.
        signal.signal(signal.SIGINT, self.on_sigint)
        filename = f"<cell-{request.execution_count}>"
        try:
            tree = ast.parse(request.code, filename, "exec")
        except (SyntaxError, ValueError) as exc:  # ValueError: source holds a NUL byte
            return _done_with(exc, None)
        linecache.cache[filename] = (
            len(request.code),
            None,
            request.code.splitlines(keepends=True),
            filename,
        )
        last_expression: ast.Expression | None = None
        show_result = not request.code.rstrip().endswith(";")
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr):
            tree.body.pop()
            last_expression = ast.Expression(last.value)
        try:
            body = compile(tree, filename, "exec")
            tail = compile(last_expression, filename, "eval") if last_expression else None
        except (SyntaxError, ValueError) as exc:
            return _done_with(exc, None)
        try:
            self._in_user_code = True
            exec(body, self.namespace)
            value = eval(tail, self.namespace) if tail is not None else None
            self._in_user_code = False
        except BaseException as exc:
            self._in_user_code = False
            self.show_open_figures()
            return _done_with(exc, exc.__traceback__)
        if value is not None and show_result:
            self.namespace["_"] = value
            self._send_output(value, execution_pb2.Output.RESULT)
        self.show_open_figures()
        return executor_pb2.WorkerDone()


def _done_with(exc: BaseException, tb: TracebackType | None) -> executor_pb2.WorkerDone:
    # Drop the worker's own frame: the caller wants frames of its code only.
    user_tb = tb.tb_next if tb is not None else None
    try:
        lines = "".join(traceback.format_exception(type(exc), exc, user_tb)).splitlines()
        evalue = str(exc)
    except Exception as formatting_error:  # an exception whose __str__ raises
        lines = [f"<traceback unavailable: {formatting_error!r}>"]
        evalue = f"<str() failed: {type(formatting_error).__name__}>"
    error = execution_pb2.ExecutionError(
        kind=execution_pb2.ExecutionError.EXCEPTION,
        ename=type(exc).__name__,
        evalue=_clip(evalue, MAX_EVALUE_CHARS),
        traceback=_clip_lines(lines),
    )
    return executor_pb2.WorkerDone(error=error)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def _clip_lines(lines: list[str]) -> list[str]:
    """Bounds a traceback: its first frames and its last (where the error is) survive."""
    lines = [_clip(line, MAX_TRACEBACK_LINE_CHARS) for line in lines]
    if len(lines) <= MAX_TRACEBACK_LINES:
        return lines
    head, tail = MAX_TRACEBACK_LINES // 4, MAX_TRACEBACK_LINES - MAX_TRACEBACK_LINES // 4
    omitted = len(lines) - head - tail
    return [*lines[:head], f"[... {omitted} lines omitted ...]", *lines[-tail:]]


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass  # user code may have put anything in sys.stdout
    try:
        ctypes.CDLL(None).fflush(None)  # C extensions' stdio buffers
    except (OSError, AttributeError):
        pass


def _wait_output_taken() -> None:
    """Waits (briefly, at most) until the daemon has read what the code printed so far: it
    reads stdout, stderr and the replies on separate pipes, in whatever order the kernel
    reports them ready, so an output sent while printed text still sits in a pipe could
    overtake that text. Once a pipe is empty, its text is ahead of the output on the daemon's
    side (its read comes first and is forwarded in the same step)."""
    _flush_all()
    deadline = time.monotonic() + OUTPUT_ORDER_WAIT
    for fd in (1, 2):
        with contextlib.suppress(OSError):  # user code closed or replaced the descriptor
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            while _pending_bytes(fd) and time.monotonic() < deadline:
                time.sleep(0.0002)


def _pending_bytes(fd: int) -> int:
    """Bytes written to the pipe on `fd` and not yet read (FIONREAD works on either end)."""
    pending: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return pending


def _write_marker(fd: int, marker: bytes) -> None:
    try:
        os.write(fd, marker)
    except OSError:
        pass  # user code closed or broke the descriptor; the daemon stops waiting after a grace


def seed_matplotlib_cache() -> None:
    """Copies the font list that the image build made into matplotlib's config directory
    (MPLCONFIGDIR, on the sandbox's /tmp): matplotlib wants it writable, so it cannot stay in
    the read-only image, and without it every sandbox's first `import matplotlib` scans the
    fonts again (25 to 100 ms of CPU here). Anything amiss only costs that scan."""
    target = os.environ.get("MPLCONFIGDIR", "")
    if not target or not os.path.isdir(BUILT_MATPLOTLIB_CACHE):
        return
    with contextlib.suppress(OSError):
        os.makedirs(target, mode=0o700, exist_ok=True)
        for name in os.listdir(BUILT_MATPLOTLIB_CACHE):
            destination = os.path.join(target, name)
            if not os.path.lexists(destination):
                shutil.copyfile(os.path.join(BUILT_MATPLOTLIB_CACHE, name), destination)


def preload(
    modules: list[str], hurry_fd: int = -1, grace: float = 0.0
) -> executor_pb2.WorkerPreloaded:
    """Imports the modules this sandbox preloads, so that user code's first `import pandas`
    costs nothing. What they print is dropped (it belongs to no execution); what fails is
    reported, and user code that imports it later sees the error itself. Stops before the
    next module once the daemon says "!" on `hurry_fd`: an execution is waiting (user code
    then imports what it needs itself; a module is never left half imported).

    A cold sandbox's first worker first waits `grace` seconds for that word: its first
    execution usually comes within them, and then nothing is imported for nothing (under a
    burst of cold creates, the part of the preload an execution cannot stop cost ~40 ms of
    CPU each). "+" ends the grace: someone waits for the preload itself."""
    started = time.monotonic()
    failures = []
    sink = io.StringIO()
    if _hurried(hurry_fd, grace):
        modules = []
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        for name in modules:
            if _hurried(hurry_fd, 0.0):
                break
            try:
                importlib.import_module(name)
            except BaseException as exc:  # SystemExit, MemoryError under a small RLIMIT_AS
                failures.append(f"{name}: {type(exc).__name__}: {exc}"[:1000])
    reply = executor_pb2.WorkerPreloaded(failures=failures)
    reply.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
    return reply


def _hurried(hurry_fd: int, wait: float) -> bool:
    """Whether the daemon said "!" (or closed the pipe: it wants nothing preloaded any more),
    waiting at most `wait` seconds for a word; "+" ends the wait without hurrying."""
    while hurry_fd >= 0 and select.select([hurry_fd], [], [], wait)[0]:
        word = os.read(hurry_fd, 1)
        if word != b"+":
            return True
        wait = 0.0
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests-fd", type=int, required=True)
    parser.add_argument("--replies-fd", type=int, required=True)
    parser.add_argument("--workspace", default="/workspace")
    parser.add_argument("--memory-limit", type=int, default=0, help="RLIMIT_AS in bytes")
    parser.add_argument("--process-limit", type=int, default=0, help="RLIMIT_NPROC")
    parser.add_argument("--preload", default="", help="comma-separated modules to import")
    args = parser.parse_args()
    worker_pid = os.getpid()
    # Readable once an execution waits for the preload (worker_process.HURRY_FD_VARIABLE;
    # not imported from there: that module imports asyncio). User code does not see it.
    hurry_text = os.environ.pop("PETRI_HURRY_FD", "")
    hurry_fd = int(hurry_text) if hurry_text.isdigit() else -1
    grace_text = os.environ.pop("PETRI_PRELOAD_GRACE", "")
    grace = float(grace_text) if grace_text.replace(".", "", 1).isdigit() else 0.0
    if args.memory_limit:
        # Where no memory cgroup is delegated, this is the memory limit that holds: every
        # process of user code gets at most this much address space (MemoryError beyond).
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    if args.process_limit:
        resource.setrlimit(resource.RLIMIT_NPROC, (args.process_limit, args.process_limit))
    # User code's subprocesses must not inherit the protocol pipes.
    os.set_inheritable(args.requests_fd, False)
    os.set_inheritable(args.replies_fd, False)
    if hurry_fd >= 0:
        os.set_inheritable(hurry_fd, False)
    sys.argv = [""]
    os.chdir(args.workspace)

    worker = Worker(args.replies_fd)
    builtins.display = worker.display  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, worker.on_sigint)
    worker.send(executor_pb2.WorkerReply(ready=executor_pb2.WorkerReady(pid=os.getpid())))
    # Ready, then preloading: the daemon (and a sandbox's creation) need not wait for it; the
    # first execution does, or stops it (see preload). Before /workspace is on sys.path: a
    # user's pandas.py found there after a crash must not be imported in the real one's place.
    modules = [name for name in args.preload.split(",") if name]
    seed_matplotlib_cache()  # also for user code's own `import matplotlib`
    worker.send(executor_pb2.WorkerReply(preloaded=preload(modules, hurry_fd, min(grace, 10.0))))
    if hurry_fd >= 0:
        os.close(hurry_fd)  # user code has no use for it
    namespace_snapshot.import_pickler()
    # Now, with the limits set and our modules loaded, user code may import its own files,
    # as in a notebook (the worker started isolated: see worker_process.WorkerProcess.start).
    sys.path.insert(0, args.workspace)
    restorer = namespace_snapshot.Restorer()  # a saved namespace being received
    while True:
        payload = read_frame(args.requests_fd)
        if payload is None:
            return  # the daemon closed the pipe: it wants us gone
        request = executor_pb2.WorkerRequest.FromString(payload)
        if request.HasField("snapshot"):
            snapshot = namespace_snapshot.save(
                worker.namespace, request.snapshot.limit_bytes, worker.send_namespace_chunk
            )
            if os.getpid() != worker_pid:  # a child forked by a __reduce__: not the worker
                os._exit(1)
            worker.send(executor_pb2.WorkerReply(snapshot=snapshot))
            continue
        if request.HasField("restore"):
            step = request.restore
            if step.HasField("chunk"):
                restorer.feed(step.chunk)
            elif step.apply:
                restored = restorer.apply(worker.namespace)
                if os.getpid() != worker_pid:
                    os._exit(1)
                worker.send(executor_pb2.WorkerReply(restored=restored))
                restorer = namespace_snapshot.Restorer()
            else:  # discard: the restore was abandoned
                restorer = namespace_snapshot.Restorer()
            continue
        done = worker.run(request)
        if os.getpid() != worker_pid:
            # A child that user code forked and that returned here: it must not speak the
            # protocol (or read the next request) in the worker's name.
            _flush_all()
            os._exit(1 if done.HasField("error") else 0)
        _flush_all()
        marker = request.end_marker.encode()
        _write_marker(1, marker)
        _write_marker(2, marker)
        worker.send(executor_pb2.WorkerReply(done=done))


if __name__ == "__main__":
    main()
