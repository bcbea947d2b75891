"""The executor's Checkpoint and Restore calls, with in-process daemons, real supervisors and
workers (no container): namespaces and workspaces round-trip whole (beyond one frame's 64 MiB),
a workspace that cannot be archived whole fails the checkpoint, a checkpoint waits for the
execution in progress, and a hostile checkpoint writes nothing outside the workspace and runs
its pickles only in the worker."""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import stat
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from executor.daemon import KEY_METADATA, CallerCheck, ExecutorService
from executor.supervisor import Supervisor
from petri.protocol import CHECKPOINT_CHUNK_BYTES
from petri.v1 import executor_pb2, executor_pb2_grpc
from tests.unit.executor.test_namespace_snapshot import SESSION, entry

if TYPE_CHECKING:
    from petri.v1.executor_pb2_grpc import ExecutorAsyncStub as Stub

KEY = "the-controllers-secret"
KEYED = ((KEY_METADATA, KEY),)
Chunks = list[executor_pb2.CheckpointChunk]


@dataclass
class Daemon:
    stub: Stub
    supervisor: Supervisor
    workspace: Path


Start = Callable[[str], Awaitable[Daemon]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Starts daemons, each with its workspace under tmp_path/<name>/workspace."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start_one(name: str) -> Daemon:
        (tmp_path / name / "workspace").mkdir(parents=True)
        workspace = tmp_path / name / "workspace"
        supervisor = Supervisor(workspace)
        await supervisor.start()
        server = grpc.aio.server(
            interceptors=[CallerCheck(KEY)],
            options=[("grpc.max_receive_message_length", 8 << 20)],
        )
        executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorService(supervisor), server)
        address = f"unix:{tmp_path / name / 'executor.sock'}"
        server.add_insecure_port(address)
        await server.start()
        channel = grpc.aio.insecure_channel(address)

        async def stop() -> None:
            await channel.close()
            await server.stop(None)
            await supervisor.close()

        stops.append(stop)
        return Daemon(executor_pb2_grpc.ExecutorStub(channel), supervisor, workspace)

    yield start_one
    for stop in stops:
        await stop()
    # pytest removes old temporary directories recursively: a 1,500-deep tree would break
    # that (RecursionError) for every later run. rm has no such limit.
    remove = await asyncio.create_subprocess_exec("rm", "-rf", "--", *map(str, tmp_path.iterdir()))
    assert await remove.wait() == 0


async def execute(daemon: Daemon, code: str) -> list[executor_pb2.ExecuteEvent]:
    request = executor_pb2.ExecuteRequest(code=code, timeout=Duration(seconds=60))
    call = daemon.stub.Session(metadata=KEYED)
    await call.write(executor_pb2.ExecuteInput(request=request, inputs_end_here=True))
    events: list[executor_pb2.ExecuteEvent] = []
    while not (events and events[-1].HasField("result")):
        batch = await call.read()
        assert isinstance(batch, executor_pb2.ExecuteEvents), batch
        events.extend(batch.events)
    await call.done_writing()
    await call.code()
    return events


async def value(daemon: Daemon, code: str) -> str:
    events = await execute(daemon, code)
    assert not events[-1].result.HasField("error"), events[-1].result.error
    shown = [e.output.text["text/plain"] for e in events if e.HasField("output")]
    return shown[-1] if shown else ""


async def checkpoint(daemon: Daemon, limit: int = 1 << 30) -> Chunks:
    call = daemon.stub.Checkpoint(
        executor_pb2.CheckpointRequest(namespace_limit_bytes=limit), metadata=KEYED
    )
    chunks = [chunk async for chunk in call]
    parts = [str(chunk.WhichOneof("part")) for chunk in chunks]
    order = ["namespace", "workspace", "summary"]
    assert parts == sorted(parts, key=order.index)
    assert parts[-1] == "summary" and parts.count("summary") == 1
    sizes = [len(chunk.namespace or chunk.workspace) for chunk in chunks]
    assert max(sizes) <= CHECKPOINT_CHUNK_BYTES
    return chunks


async def restore(daemon: Daemon, chunks: Iterable[executor_pb2.CheckpointChunk]) -> Any:
    return await daemon.stub.Restore(iter(chunks), metadata=KEYED)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def tree(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Everything under root (itself included), by path: type, mode, mtime and contents or
    target. Iterative: a 1,500-deep tree is deeper than Python's recursion limit."""
    found: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        relative = stack.pop()
        path = os.path.join(base, relative) if relative else base
        info = os.lstat(path)
        kind = stat.S_IFMT(info.st_mode)
        content: Any = None
        if stat.S_ISDIR(info.st_mode):
            stack.extend(os.path.join(relative, name) for name in os.listdir(path))
        elif stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        else:
            with open(path, "rb") as file:
                content = file.read()
        found[relative] = (kind, stat.S_IMODE(info.st_mode), info.st_mtime_ns, content)
    return found


DEPTH = 1500


def fill_workspace(workspace: Path) -> None:
    (workspace / "data.bin").write_bytes(bytes(range(256)) * 1000)
    (workspace / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (workspace / "script.sh").chmod(0o750)
    (workspace / "empty").mkdir()
    (workspace / "empty").chmod(0o700)
    (workspace / "sub" / "inner").mkdir(parents=True)
    (workspace / "sub" / "inner" / "note.txt").write_text("inner")
    (workspace / "link").symlink_to("sub/inner/note.txt")
    (workspace / "dangling").symlink_to("/nowhere/at/all")
    os.link(workspace / "data.bin", workspace / "hardlink.bin")
    with open(os.path.join(os.fsencode(workspace), b"caf\xe9-\xff.txt"), "wb") as file:
        file.write(b"latin-1 name")
    deep = os.fsencode(workspace / "deep")
    os.mkdir(deep)
    for _ in range(DEPTH):  # os.makedirs recurses once per level: too deep for it
        deep += b"/d"
        os.mkdir(deep)
    with open(deep + b"/bottom.txt", "wb") as file:
        file.write(b"bottom")
    os.utime(workspace / "data.bin", ns=(1, 1_000_000_123_456_789))
    os.utime(workspace / "empty", ns=(1, 981_173_106_123_456_789))


async def test_a_checkpoint_round_trips_the_namespace_and_every_file(start: Start) -> None:
    old, new = await start("old"), await start("new")
    fill_workspace(old.workspace)
    unsaved = (
        "import socket, threading\n"
        "gen = (i for i in range(3))\n"
        "lock = threading.Lock()\n"
        "handle = open('/dev/null')\n"
        "sock = socket.socket()\n"
        "thread = threading.Thread(target=lambda: None)\n"
    )
    for code in (SESSION, unsaved, "import os; os.getpid()"):
        assert not (await execute(old, code))[-1].result.HasField("error")
    before = await old.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    files = tree(old.workspace)

    chunks = await checkpoint(old)
    summary = chunks[-1].summary
    assert summary.execution_count == 3
    assert {lost.name for lost in summary.lost} == {"gen", "lock", "handle", "sock", "thread"}
    assert all(lost.reason for lost in summary.lost)
    assert summary.workspace_bytes > 256_000 and summary.namespace_bytes > 0
    # The sandbox runs on as it was: same worker, same namespace.
    after = await old.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    assert after.incarnation == before.incarnation and after.execution_count == 3
    assert await value(old, "add5(1)") == "6"

    fresh = await new.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    result = await restore(new, chunks)
    assert result.execution_count == 3 and list(result.lost) == []
    assert result.incarnation and result.incarnation != fresh.incarnation
    assert tree(new.workspace) == files
    assert len(files) > DEPTH
    assert (
        os.stat(new.workspace / "hardlink.bin").st_ino == os.stat(new.workspace / "data.bin").st_ino
    )
    checks = (
        "(array.sum(), frame['a'].sum(), list(frame['b']), times_scale(2), point.norm2(),"
        " Point.origin().norm2(), square(7), add5(1), np.__name__, ospath.__name__,"
        " 'gen' in globals())"
    )
    assert await value(new, checks) == (
        "(np.int64(66), np.int64(6), ['x', 'y', 'z'], 6, 25, 0, 49, 6, 'numpy', 'posixpath', False)"
    )
    status = await new.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    assert status.execution_count == 4 and status.incarnation == result.incarnation


def worker_memory(daemon: Daemon, reset: bool = False) -> tuple[int, int]:
    """The worker's peak and current resident memory, in bytes; with `reset`, the peak is
    set back to the current first (/proc/PID/clear_refs)."""
    assert daemon.supervisor._worker is not None
    pid = daemon.supervisor._worker.process.pid
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as file:
            file.write("5")
    fields = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            fields[key] = rest.split()[0] if rest.split() else ""
    return int(fields["VmHWM"]) * 1024, int(fields["VmRSS"]) * 1024


async def test_a_namespace_beyond_one_frame_round_trips_without_copies(start: Start) -> None:
    """100 MB of DataFrame: more than the 64 MiB a frame between daemon and worker holds. It
    is written from the array's own memory and restored into the memory it arrived in: each
    worker's peak stays well below a second copy of it."""
    old, new = await start("old"), await start("new")
    code = (
        "import numpy as np, pandas as pd\n"
        "frame = pd.DataFrame({'v': np.arange(12_500_000, dtype=np.float64)})\n"
        "frame.memory_usage().sum()"
    )
    assert int((await value(old, code)).removeprefix("np.int64(").rstrip(")")) >= 100_000_000
    worker_memory(old, reset=True)
    chunks = await checkpoint(old)
    peak, current = worker_memory(old)
    assert peak - current < 30_000_000, (peak, current)
    assert chunks[-1].summary.namespace_bytes > 100_000_000
    assert list(chunks[-1].summary.lost) == []
    result = await restore(new, chunks)
    assert list(result.lost) == []
    peak, current = worker_memory(new)
    assert current > 100_000_000 and peak - current < 30_000_000, (peak, current)
    assert await value(new, "(len(frame), float(frame['v'].sum()))") == (
        f"(12500000, {float(sum(range(12_500_000)))})"
    )


async def test_the_namespace_limit_drops_names_beyond_it_and_must_be_positive(
    start: Start,
) -> None:
    old = await start("old")
    await execute(old, "small = 'a' * 100\nbig = b'x' * 200_000")
    chunks = await checkpoint(old, 100_000)
    summary = chunks[-1].summary
    assert [lost.name for lost in summary.lost] == ["big"]
    assert summary.namespace_bytes <= 100_000
    for limit in (0, -1):
        error = await refused(
            old.stub.Checkpoint(
                executor_pb2.CheckpointRequest(namespace_limit_bytes=limit), metadata=KEYED
            ).read()
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_file_tar_cannot_read_fails_the_checkpoint(start: Start) -> None:
    old = await start("old")
    await execute(old, "x = 1")
    (old.workspace / "fine.txt").write_text("fine")
    (old.workspace / "secret.txt").write_text("mine")
    (old.workspace / "secret.txt").chmod(0)
    call = old.stub.Checkpoint(
        executor_pb2.CheckpointRequest(namespace_limit_bytes=1 << 20), metadata=KEYED
    )
    received: Chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in call:
            received.append(chunk)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = str(caught.value.details())
    assert "secret.txt" in details and "Permission denied" in details and len(details) < 1200
    assert not any(chunk.HasField("summary") for chunk in received)
    assert await value(old, "x") == "1"  # the sandbox runs on


async def test_a_worker_that_dies_saving_fails_the_checkpoint_without_a_summary(
    start: Start,
) -> None:
    old = await start("old")
    code = "import os\nclass Bomb:\n    def __reduce__(self):\n        os._exit(3)\nbomb = Bomb()"
    await execute(old, code)
    error = await refused(checkpoint(old))
    assert error.code() == grpc.StatusCode.INTERNAL and "exited" in str(error.details())
    assert await value(old, "'bomb' in globals()") == "False"  # a new worker


async def test_a_checkpoint_waits_for_the_execution_in_progress(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = await start("old"), await start("new")
    asked = asyncio.Event()
    original = old.supervisor.checkpoint

    async def checkpoint_asked(*args: Any) -> executor_pb2.CheckpointSummary:
        asked.set()
        return await original(*args)

    monkeypatch.setattr(old.supervisor, "checkpoint", checkpoint_asked)
    code = (
        "import os, time\n"
        "print('started', flush=True)\n"
        "while not os.path.exists('go'):\n"
        "    time.sleep(0.01)\n"
        "x = 42\n"
    )
    request = executor_pb2.ExecuteRequest(code=code, timeout=Duration(seconds=60))
    session = old.stub.Session(metadata=KEYED)
    await session.write(executor_pb2.ExecuteInput(request=request, inputs_end_here=True))
    stdout = ""
    while "started\n" not in stdout:  # the code is running
        batch = await session.read()
        assert isinstance(batch, executor_pb2.ExecuteEvents), batch
        stdout += "".join(event.stdout for event in batch.events)
    saving = asyncio.create_task(checkpoint(old))
    await asyncio.wait_for(asked.wait(), 10)
    (old.workspace / "go").write_text("")  # only now may the execution end
    chunks = await saving
    assert chunks[-1].summary.execution_count == 1
    await restore(new, chunks)
    assert await value(new, "x") == "42"
    assert (new.workspace / "go").exists()
    session.cancel()


async def test_a_restore_is_refused_once_the_sandbox_ran_code_or_restored(start: Start) -> None:
    old, new = await start("old"), await start("new")
    chunks = await checkpoint(old)
    await execute(new, "x = 1")
    error = await refused(restore(new, chunks))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    await restore(old, chunks)
    error = await refused(restore(old, chunks))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await value(new, "x") == "1"


def _summary(namespace: int = 0, workspace: int = 0) -> executor_pb2.CheckpointChunk:
    return executor_pb2.CheckpointChunk(
        summary=executor_pb2.CheckpointSummary(
            execution_count=1, namespace_bytes=namespace, workspace_bytes=workspace
        )
    )


def _ns(data: bytes) -> executor_pb2.CheckpointChunk:
    return executor_pb2.CheckpointChunk(namespace=data)


def _ws(data: bytes) -> executor_pb2.CheckpointChunk:
    return executor_pb2.CheckpointChunk(workspace=data)


def _archive(*members: tuple[str, bytes, str]) -> bytes:
    """A tar archive: (name, type, link target or contents) per member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(target)
                archive.addfile(info, io.BytesIO(target.encode()))
            else:
                info.linkname = target
                info.devmajor, info.devminor = 1, 3
                archive.addfile(info)
    return buffer.getvalue()


EARLY = entry("early", pickled=pickle.dumps(1))
KEPT = _archive(("kept.txt", tarfile.REGTYPE, "kept"))


@pytest.mark.parametrize(
    "messages",
    [
        [_ws(b"x"), _ns(b"x"), _summary(len(EARLY) + 1, len(KEPT) + 1)],
        [executor_pb2.CheckpointChunk(), _summary(len(EARLY), len(KEPT))],
        [_summary(len(EARLY), len(KEPT)), _summary(len(EARLY), len(KEPT))],
        [_summary(len(EARLY) + 1, len(KEPT))],
        [_ws(b"x" * (CHECKPOINT_CHUNK_BYTES + 1))],
    ],
    ids=["namespace-after-workspace", "empty", "after-summary", "sizes", "oversized"],
)
async def test_a_malformed_checkpoint_is_refused_and_undone(start: Start, messages: Chunks) -> None:
    new = await start("new")
    error = await refused(restore(new, [_ns(EARLY), _ws(KEPT), *messages]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert os.listdir(new.workspace) == []  # what was extracted is gone
    # Nothing was restored: the sandbox may still be restored, and the first chunks are gone.
    late = entry("late", pickled=pickle.dumps(2))
    result = await restore(new, [_ns(late), _summary(len(late))])
    assert list(result.lost) == []
    assert await value(new, "('early' in globals(), late)") == "(False, 2)"


async def test_a_restore_without_its_summary_is_undone(start: Start) -> None:
    new = await start("new")
    error = await refused(restore(new, [_ns(EARLY), _ws(KEPT)]))
    assert error.code() == grpc.StatusCode.CANCELLED
    assert os.listdir(new.workspace) == []
    status = await new.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    assert status.execution_count == 0
    assert await value(new, "'early' in globals()") == "False"


@pytest.mark.parametrize(
    ("members", "code"),
    [
        ([("{outside}/abs_marker", tarfile.REGTYPE, "x")], grpc.StatusCode.OK),
        ([("../dotdot_marker", tarfile.REGTYPE, "x")], grpc.StatusCode.INVALID_ARGUMENT),
        (
            [("esc", tarfile.SYMTYPE, "{outside}"), ("esc/sym_marker", tarfile.REGTYPE, "x")],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            [("esc", tarfile.SYMTYPE, ".."), ("esc/sym_marker", tarfile.REGTYPE, "x")],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ([("hard", tarfile.LNKTYPE, "{outside}/secret")], grpc.StatusCode.INVALID_ARGUMENT),
        ([("hard", tarfile.LNKTYPE, "../secret")], grpc.StatusCode.INVALID_ARGUMENT),
        ([("null", tarfile.CHRTYPE, "")], grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=[
        "absolute",
        "dotdot",
        "symlink-absolute",
        "symlink-relative",
        "hardlink",
        "hardlink-up",
        "device",
    ],
)
async def test_a_hostile_archive_writes_nothing_outside_the_workspace(
    start: Start, members: list[tuple[str, bytes, str]], code: grpc.StatusCode
) -> None:
    new = await start("new")
    outside = new.workspace.parent
    (outside / "secret").write_text("secret")
    before = sorted(os.listdir(outside))
    concrete = [(n.format(outside=outside), k, t.format(outside=outside)) for n, k, t in members]
    data = _archive(*concrete)
    chunks = [_ws(data), _summary(0, len(data))]
    if code == grpc.StatusCode.OK:
        await restore(new, chunks)
    else:
        error = await refused(restore(new, chunks))
        assert error.code() == code
        assert "cannot be extracted" in str(error.details()), error.details()
    assert sorted(os.listdir(outside)) == before
    assert (outside / "secret").read_text() == "secret"
    assert not any((outside / name).exists() for name in ("abs_marker", "dotdot_marker"))
    assert not (outside / "sym_marker").exists()


class _Marker:
    """Unpickled, writes the pid and uid of the process that unpickles it to a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        code = (
            f"import os; open({str(self.marker)!r}, 'w').write(f'{{os.getpid()}} {{os.getuid()}}')"
        )
        return (exec, (code,))


async def test_a_tampered_namespace_runs_only_in_the_worker(start: Start, tmp_path: Path) -> None:
    new = await start("new")
    marker = tmp_path / "unpickled-by"
    saved = entry("payload", pickled=pickle.dumps(_Marker(marker)))
    saved += entry("fine", pickled=pickle.dumps([1, 2]))
    result = await restore(new, [_ns(saved), _summary(len(saved))])
    assert list(result.lost) == []
    worker = await value(new, "import os; f'{os.getpid()} {os.getuid()}'")
    assert marker.read_text() == worker.strip("'")
    assert int(marker.read_text().split()[0]) != os.getpid()  # never the daemon
    assert await value(new, "fine") == "[1, 2]"


async def test_a_worker_that_hangs_saving_fails_the_checkpoint_and_is_replaced(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("executor.supervisor.SNAPSHOT_TIMEOUT", 1.0)
    old = await start("old")
    code = "import time\nclass Slow:\n    def __reduce__(self):\n        time.sleep(3600)\n"
    code += "slow = Slow()"
    await execute(old, code)
    error = await refused(checkpoint(old))
    assert error.code() == grpc.StatusCode.INTERNAL and "no answer" in str(error.details())
    assert await value(old, "'slow' in globals()") == "False"


async def test_a_cancelled_checkpoint_leaves_the_worker_and_its_namespace(start: Start) -> None:
    old = await start("old")
    await execute(old, "import os\nbig = os.urandom(8 << 20)\nkept = 'yes'")
    before = await old.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    call = old.stub.Checkpoint(
        executor_pb2.CheckpointRequest(namespace_limit_bytes=1 << 30), metadata=KEYED
    )
    first = await call.read()
    assert isinstance(first, executor_pb2.CheckpointChunk) and first.HasField("namespace")
    call.cancel()
    # The worker's rest of the snapshot was read and dropped: its next answers line up.
    assert await value(old, "(kept, len(big))") == f"('yes', {8 << 20})"
    after = await old.stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    assert after.incarnation == before.incarnation
    chunks = await checkpoint(old)  # and a checkpoint works again
    assert chunks[-1].summary.namespace_bytes > 8 << 20
