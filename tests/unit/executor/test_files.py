"""The files API's operations beneath a workspace (executor.workspace.files), on a temporary
directory: paging in byte order, symlinks never followed, hostile trees (deep, swapped,
undecodable names) bounded, writes that leave nothing unless finished, and the same through the
executor's gRPC service."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from executor.daemon import KEY_METADATA, CallerCheck, ExecutorService
from executor.supervisor import Supervisor
from executor.workspace import files
from executor.workspace.beneath import READ_CHUNK_BYTES
from executor.workspace.files import (
    Changed,
    FileNotFound,
    FileReader,
    FileWriter,
    TooSlow,
    WrongType,
    decode_page_token,
    delete,
    list_page,
)
from petri.paths import InvalidPath
from petri.v1 import execution_pb2, executor_pb2_grpc, files_pb2

if TYPE_CHECKING:
    from petri.v1.executor_pb2_grpc import ExecutorAsyncStub as Stub

KEY = "the-controllers-secret"
KEYED = ((KEY_METADATA, KEY),)


def _all_paths(root: Path, path: str = "", recursive: bool = True, page_size: int = 3) -> list[str]:
    """Every page of a listing, concatenated."""
    paths: list[str] = []
    token = ""
    while True:
        page = list_page(root, path, recursive, page_size, decode_page_token(token))
        assert len(page.files) <= page_size
        paths += [f.path for f in page.files]
        token = page.next_page_token
        if not token:
            return paths


def test_listing_pages_in_path_byte_order(tmp_path: Path) -> None:
    # "a-c" sorts before "a/b" by bytes ("-" < "/"), although a walk by name meets "a" first.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_bytes(b"12345")
    (tmp_path / "a-c").write_text("x")
    (tmp_path / "a" / "d").mkdir()
    (tmp_path / "a" / "d" / "e").write_text("x")
    (tmp_path / "z").write_text("x")
    os.symlink("/etc", tmp_path / "link")
    expected = ["a", "a-c", "a/b", "a/d", "a/d/e", "link", "z"]
    for page_size in (1, 2, 3, 100):
        assert _all_paths(tmp_path, page_size=page_size) == expected
    assert _all_paths(tmp_path, recursive=False) == ["a", "a-c", "link", "z"]
    assert _all_paths(tmp_path, "a") == ["a/b", "a/d", "a/d/e"]
    page = list_page(tmp_path, "", True, 100, None)
    by_path = {f.path: f for f in page.files}
    assert by_path["a/b"].type == files_pb2.FileInfo.REGULAR and by_path["a/b"].size == 5
    assert by_path["a"].type == files_pb2.FileInfo.DIRECTORY
    assert by_path["link"].type == files_pb2.FileInfo.SYMLINK  # listed, not followed
    assert by_path["link"].size == len("/etc")
    assert by_path["z"].mode == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_listing_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    os.symlink("/", tmp_path / "root-link")
    with pytest.raises(FileNotFound):
        list_page(tmp_path, "missing", False, 10, None)
    with pytest.raises(WrongType):
        list_page(tmp_path, "file", False, 10, None)
    with pytest.raises(WrongType):
        list_page(tmp_path, "root-link", False, 10, None)
    with pytest.raises(InvalidPath):  # through a symlink
        list_page(tmp_path, "root-link/etc", False, 10, None)
    with pytest.raises(InvalidPath):  # through a file
        list_page(tmp_path, "file/x", False, 10, None)
    with pytest.raises(InvalidPath):
        decode_page_token("not base64 !")


def test_undecodable_names_are_listed_escaped(tmp_path: Path) -> None:
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    page = list_page(tmp_path, "", True, 10, None)
    assert [f.path for f in page.files] == ["caf\\xe9"]
    page.SerializeToString()  # valid UTF-8: it goes on the wire


def test_a_deep_tree_is_listed_to_the_depth_limit_only(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(1500):  # deeper than PATH_MAX allows to name
            os.mkdir("d", dir_fd=fd)
            next_fd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    paths = _all_paths(tmp_path, page_size=1000)
    assert len(paths) == files.MAX_LIST_DEPTH
    assert paths[-1] == "/".join(["d"] * files.MAX_LIST_DEPTH)
    delete(tmp_path, "d", recursive=True, allow_missing=False)  # one descriptor at a time
    assert os.listdir(tmp_path) == []


def test_a_huge_listing_stops_at_its_time_limit(tmp_path: Path) -> None:
    for index in range(600):
        (tmp_path / str(index)).touch()
    with pytest.raises(TooSlow):
        list_page(tmp_path, "", False, 10, None, seconds=0)
    assert len(list_page(tmp_path, "", False, 10_000, None).files) == 600


def test_many_small_directories_count_against_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(300):  # empty: only a check per directory sees them
        (tmp_path / "dirs" / str(index)).mkdir(parents=True)
    ticks = iter(range(1_000_000))  # a clock that moves one second per look
    monkeypatch.setattr(files, "_clock", lambda: float(next(ticks)))
    with pytest.raises(TooSlow):
        list_page(tmp_path, "dirs", True, 10_000, None, seconds=100)
    with pytest.raises(TooSlow):
        delete(tmp_path, "dirs", recursive=True, allow_missing=False, seconds=100)
    assert 0 < len(os.listdir(tmp_path / "dirs")) < 300  # what was removed stays removed


def test_read_streams_a_regular_file_and_refuses_the_rest(tmp_path: Path) -> None:
    data = os.urandom(3 * READ_CHUNK_BYTES + 5)
    (tmp_path / "big").write_bytes(data)
    reader = FileReader(tmp_path, "big")
    chunks = []
    while not reader.done:
        chunks.append(reader.next_chunk())
    reader.check_unchanged()
    reader.close()
    assert b"".join(chunks) == data and max(map(len, chunks)) == READ_CHUNK_BYTES
    (tmp_path / "empty").touch()
    empty = FileReader(tmp_path, "empty")
    assert empty.done and empty.size == 0
    empty.close()
    os.symlink("/etc/passwd", tmp_path / "outside")
    (tmp_path / "dir").mkdir()
    os.symlink("/etc", tmp_path / "etc")
    with pytest.raises(WrongType):
        FileReader(tmp_path, "outside")
    with pytest.raises(WrongType):
        FileReader(tmp_path, "dir")
    with pytest.raises(InvalidPath):
        FileReader(tmp_path, "etc/passwd")
    with pytest.raises(FileNotFound):
        FileReader(tmp_path, "missing")
    with pytest.raises(InvalidPath):
        FileReader(tmp_path, "big/x")  # a path component that is a file


def test_a_file_changed_while_read_is_an_error_not_a_final_chunk(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * (2 * READ_CHUNK_BYTES))
    reader = FileReader(tmp_path, "f")
    reader.next_chunk()
    (tmp_path / "f").write_bytes(b"short")  # truncated under the reader
    with pytest.raises(Changed):
        reader.next_chunk()
    reader.close()
    (tmp_path / "g").write_bytes(b"abc")
    reader = FileReader(tmp_path, "g")
    reader.next_chunk()
    with open(tmp_path / "g", "ab") as handle:
        handle.write(b"more")  # grown after the stated size
    with pytest.raises(Changed):
        reader.check_unchanged()
    reader.close()


def test_write_stages_beside_the_target_and_commits_on_request(tmp_path: Path) -> None:
    writer = FileWriter(tmp_path, "new/dirs/file.txt")
    writer.write(b"hello ")
    writer.write(b"world")
    assert not (tmp_path / "new").exists()  # nothing visible, not even the directories
    info = writer.commit()
    assert (tmp_path / "new/dirs/file.txt").read_bytes() == b"hello world"
    assert info.st_size == 11
    assert os.listdir(tmp_path / "new/dirs") == ["file.txt"]  # no staging file left
    # Replacing a file is fine; an unfinished write leaves the old one as it was.
    replaced = FileWriter(tmp_path, "new/dirs/file.txt")
    replaced.write(b"half")
    replaced.discard()
    assert (tmp_path / "new/dirs/file.txt").read_bytes() == b"hello world"
    assert os.listdir(tmp_path / "new/dirs") == ["file.txt"]
    again = FileWriter(tmp_path, "new/dirs/file.txt")
    again.write(b"v2")
    again.commit()
    assert (tmp_path / "new/dirs/file.txt").read_bytes() == b"v2"


def test_write_refuses_directories_symlinks_and_files_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    os.symlink("/tmp", tmp_path / "tmp-link")
    os.symlink("/etc/passwd", tmp_path / "passwd-link")
    with pytest.raises(WrongType):
        FileWriter(tmp_path, "dir")
    with pytest.raises(InvalidPath):
        FileWriter(tmp_path, "tmp-link/x")
    with pytest.raises(InvalidPath):
        FileWriter(tmp_path, "passwd-link")
    with pytest.raises(InvalidPath):
        FileWriter(tmp_path, "file/x")
    assert sorted(os.listdir(tmp_path)) == ["dir", "file", "passwd-link", "tmp-link"]


def test_a_directory_swapped_for_a_symlink_before_the_commit_is_not_followed(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    workspace = tmp_path / "workspace"
    outside.mkdir()
    (workspace / "sub").mkdir(parents=True)
    writer = FileWriter(workspace, "sub/deeper/f")
    writer.write(b"data")
    # User code swaps the directory the file goes to for a symlink out of the workspace.
    (workspace / "sub").rename(workspace / "moved")
    os.symlink(outside, workspace / "sub")
    writer.commit()  # lands in the directory it was staged in, wherever that moved
    assert os.listdir(outside) == []
    assert (workspace / "moved" / "deeper" / "f").read_bytes() == b"data"
    # A swap before the writer starts is refused outright.
    with pytest.raises(InvalidPath):
        FileWriter(workspace, "sub/x")


def test_delete(tmp_path: Path) -> None:
    (tmp_path / "tree/a/b").mkdir(parents=True)
    (tmp_path / "tree/a/b/f").write_text("x")
    (tmp_path / "tree/g").write_text("x")
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, tmp_path / "tree/link")
    os.symlink(outside, tmp_path / "link")
    with pytest.raises(WrongType):
        delete(tmp_path, "tree", recursive=False, allow_missing=False)
    delete(tmp_path, "link", recursive=False, allow_missing=False)  # the link, not its target
    delete(tmp_path, "tree", recursive=True, allow_missing=False)
    assert os.listdir(tmp_path) == []
    assert os.listdir(outside) == ["keep"]
    with pytest.raises(FileNotFound):
        delete(tmp_path, "tree", recursive=True, allow_missing=False)
    delete(tmp_path, "tree", recursive=True, allow_missing=True)
    delete(tmp_path, "no/such/dir", recursive=False, allow_missing=True)


# --- through the executor's gRPC service ---------------------------------------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Stub, Path]]:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    supervisor = Supervisor(workspace)
    service = ExecutorService(supervisor)
    server = grpc.aio.server(interceptors=[CallerCheck(KEY)])
    executor_pb2_grpc.add_ExecutorServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{tmp_path / 'executor.sock'}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'executor.sock'}") as channel:
        yield executor_pb2_grpc.ExecutorStub(channel), workspace
    await server.stop(None)
    service.close()


def _write(path: str, data: bytes, final: bool) -> files_pb2.WriteFileRequest:
    return files_pb2.WriteFileRequest(
        chunk=execution_pb2.FileChunk(path=path, data=data, final=final)
    )


async def test_service_round_trip_and_statuses(served: tuple[Stub, Path]) -> None:
    stub, workspace = served
    info = await stub.WriteFile(
        iter([_write("d/f.bin", b"ab", False), _write("d/f.bin", b"cd", True)]), metadata=KEYED
    )
    assert (info.path, info.size, info.type) == ("d/f.bin", 4, files_pb2.FileInfo.REGULAR)
    chunks = [
        c async for c in stub.ReadFile(files_pb2.ReadFileRequest(path="d/f.bin"), metadata=KEYED)
    ]
    assert b"".join(c.data for c in chunks) == b"abcd" and chunks[0].size == 4
    assert [c.final for c in chunks] == [*([False] * (len(chunks) - 1)), True]
    (workspace / "empty").touch()
    empty = [
        c async for c in stub.ReadFile(files_pb2.ReadFileRequest(path="empty"), metadata=KEYED)
    ]
    assert [(c.data, c.final, c.size) for c in empty] == [(b"", True, 0)]
    listing = await stub.ListFiles(files_pb2.ListFilesRequest(recursive=True), metadata=KEYED)
    assert [f.path for f in listing.files] == ["d", "d/f.bin", "empty"]
    await stub.DeleteFile(files_pb2.DeleteFileRequest(path="d", recursive=True), metadata=KEYED)
    calls: list[tuple[Awaitable[object], str]] = [
        (stub.ListFiles(files_pb2.ListFilesRequest(path="d"), metadata=KEYED), "NOT_FOUND"),
        (
            stub.ListFiles(files_pb2.ListFilesRequest(path="empty"), metadata=KEYED),
            "FAILED_PRECONDITION",
        ),
        (
            stub.ListFiles(files_pb2.ListFilesRequest(page_size=10_001), metadata=KEYED),
            "INVALID_ARGUMENT",
        ),
        (stub.DeleteFile(files_pb2.DeleteFileRequest(path="d"), metadata=KEYED), "NOT_FOUND"),
        (
            stub.DeleteFile(files_pb2.DeleteFileRequest(path="../x"), metadata=KEYED),
            "INVALID_ARGUMENT",
        ),
    ]
    for call, code in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code().name == code
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReadFile(files_pb2.ReadFileRequest(path="nothing"), metadata=KEYED).read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_write_that_ends_early_leaves_nothing(served: tuple[Stub, Path]) -> None:
    stub, workspace = served
    # Half-closed without the final chunk.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WriteFile(iter([_write("a/f", b"x" * 1000, False)]), metadata=KEYED)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    # Cancelled midway, after some chunks were written to the staging file.
    call = stub.WriteFile(metadata=KEYED)
    await call.write(_write("f", b"x" * (1 << 20), False))
    await call.write(_write("f", b"x" * (1 << 20), False))
    await _wait_for(lambda: any(n.startswith(".petri-incoming-") for n in os.listdir(workspace)))
    call.cancel()
    await _wait_for(lambda: os.listdir(workspace) == [])
    # A path that changes between chunks.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WriteFile(
            iter([_write("f", b"x", False), _write("g", b"y", True)]), metadata=KEYED
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _wait_for(lambda: os.listdir(workspace) == [])


async def _wait_for(condition: object, seconds: float = 30.0) -> None:  # generous: CI is loaded
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class _Context:
    """What the service's handlers use of a gRPC context (none of it, when cancelled)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")

    async def write(self, message: object) -> None:
        await asyncio.Event().wait()


@pytest.mark.parametrize("operation", ["read", "write"])
async def test_a_call_cancelled_while_its_file_opens_closes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    """The file thread opens the file while the handler awaits it: a cancel then must not
    leave the descriptors (and a write's staging file) to nobody."""
    (tmp_path / "f").write_bytes(b"data")
    opened, release = threading.Event(), threading.Event()
    closed: list[object] = []

    class GatedReader(FileReader):
        def __init__(self, root: Path, path: str) -> None:
            super().__init__(root, path)
            opened.set()
            release.wait(10)

        def close(self) -> None:
            closed.append(self)
            super().close()

    class GatedWriter(FileWriter):
        def __init__(self, root: Path, path: str) -> None:
            super().__init__(root, path)
            opened.set()
            release.wait(10)

        def discard(self) -> None:
            closed.append(self)
            super().discard()

    monkeypatch.setattr("executor.daemon.FileReader", GatedReader)
    monkeypatch.setattr("executor.daemon.FileWriter", GatedWriter)
    service = ExecutorService(Supervisor(tmp_path))
    context: Any = _Context()

    async def requests() -> AsyncIterator[files_pb2.WriteFileRequest]:
        yield _write("new", b"x", False)
        await asyncio.Event().wait()  # a caller that goes quiet, then cancels

    call: Awaitable[object]
    if operation == "read":
        call = service.ReadFile(files_pb2.ReadFileRequest(path="f"), context)
    else:
        call = service.WriteFile(requests(), context)
    task = asyncio.ensure_future(call)
    try:
        assert await asyncio.to_thread(opened.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()
    await _wait_for(lambda: len(closed) == 1)
    await _wait_for(lambda: os.listdir(tmp_path) == ["f"])  # no staging file left
    service.close()


def test_a_page_of_long_paths_ends_at_its_byte_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """User code names the entries: a full page of paths 64 levels of 255-byte names deep
    was a message of 160 MiB for the controller to hold. A page now ends at MAX_PAGE_BYTES,
    and the pages still give every entry once."""
    monkeypatch.setattr(files, "MAX_PAGE_BYTES", 8192)
    names = sorted(f"{i:03d}" + "x" * 200 for i in range(100))
    for name in names:
        (tmp_path / name).touch()
    first = list_page(tmp_path, "", False, 1000, None)
    assert 0 < len(first.files) < 100 and first.ByteSize() <= 8192 + 512
    assert first.next_page_token
    assert _all_paths(tmp_path, page_size=1000) == names


def test_a_delete_checks_its_time_limit_within_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over a directory was never timed: user code creating files in it as fast as
    they are removed kept the file thread, every files call's, for ever."""
    (tmp_path / "dir").mkdir()
    for index in range(1000):
        (tmp_path / "dir" / str(index)).touch()
    ticks = iter(range(1_000_000))  # a clock that moves one second per look
    monkeypatch.setattr(files, "_clock", lambda: float(next(ticks)))
    with pytest.raises(TooSlow):
        delete(tmp_path, "dir", recursive=True, allow_missing=False, seconds=3)
    assert 0 < len(os.listdir(tmp_path / "dir")) < 1000  # what was removed stays removed
