"""The files API through the real API of an in-process controller whose sandboxes run a
stand-in executor: what the servicer refuses before any byte reaches a sandbox, what an
oversized or unfinished write leaves (nothing), how the executor's statuses read, a PAUSED
sandbox resumed first, and a hostile executor's chunks refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from petri.v1 import execution_pb2, files_pb2, sandbox_pb2
from tests.unit.controller.inprocess import Petri, expect, fast_petri, wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _chunk(name: str, path: str, data: bytes, final: bool) -> files_pb2.WriteFileRequest:
    return files_pb2.WriteFileRequest(
        name=name, chunk=execution_pb2.FileChunk(path=path, data=data, final=final)
    )


async def _read(petri: Petri, name: str, path: str) -> list[execution_pb2.FileChunk]:
    call = petri.stub.ReadFile(files_pb2.ReadFileRequest(name=name, path=path))
    return [chunk async for chunk in call]


async def test_write_list_read_delete(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("files")
        info = await petri.stub.WriteFile(
            iter(
                [
                    _chunk(sandbox.name, "data/a.csv", b"x,y\n", False),
                    _chunk("", "data/a.csv", b"1,2\n", True),  # later messages: name ignored
                ]
            )
        )
        assert (info.path, info.size, info.mime_type) == ("data/a.csv", 8, "text/csv")
        executor = await petri.executor(sandbox.name)
        assert executor.files == {"data/a.csv": b"x,y\n1,2\n"}
        chunks = await _read(petri, sandbox.name, "data/a.csv")
        assert b"".join(c.data for c in chunks) == b"x,y\n1,2\n"
        assert (chunks[0].size, chunks[0].mime_type) == (8, "text/csv")
        assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
        listing = await petri.stub.ListFiles(files_pb2.ListFilesRequest(name=sandbox.name))
        assert [(f.path, f.mime_type) for f in listing.files] == [("data/a.csv", "text/csv")]
        await petri.stub.DeleteFile(
            files_pb2.DeleteFileRequest(name=sandbox.name, path="data/a.csv")
        )
        assert executor.files == {}
        await petri.stub.DeleteFile(
            files_pb2.DeleteFileRequest(name=sandbox.name, path="data/a.csv", allow_missing=True)
        )
        # A missing file reads apart from a missing sandbox.
        await expect(
            _read(petri, sandbox.name, "data/a.csv"),
            grpc.StatusCode.NOT_FOUND,
            f"no file 'data/a.csv' in sandbox {sandbox.name}'s /workspace",
        )
        await expect(
            _read(petri, "projects/default/sandboxes/nope", "a"),
            grpc.StatusCode.NOT_FOUND,
            "sandbox projects/default/sandboxes/nope does not exist",
        )
        calls = ["WriteFile", "ReadFile", "ListFiles", "DeleteFile", "DeleteFile", "ReadFile"]
        assert executor.file_calls == calls


async def test_bad_requests_are_refused_before_the_sandbox_sees_them(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("strict")
        name = sandbox.name
        stub = petri.stub
        for path in ("../etc/passwd", "/abs", "a//b", "x\0y", "a/" * 70 + "b"):
            await expect(_read(petri, name, path), INVALID)
            await expect(
                stub.DeleteFile(files_pb2.DeleteFileRequest(name=name, path=path)), INVALID
            )
            await expect(stub.WriteFile(iter([_chunk(name, path, b"x", True)])), INVALID)
        await expect(_read(petri, name, ""), INVALID, "empty")
        await expect(stub.ListFiles(files_pb2.ListFilesRequest(name=name, path="..")), INVALID)
        await expect(
            stub.ListFiles(files_pb2.ListFilesRequest(name=name, page_size=10_001)),
            INVALID,
            "page_size",
        )
        await expect(stub.ListFiles(files_pb2.ListFilesRequest(name=name, page_size=-1)), INVALID)
        await expect(stub.ListFiles(files_pb2.ListFilesRequest(name="bad name")), INVALID)
        writes: list[tuple[Iterable[files_pb2.WriteFileRequest], str]] = [
            ([], "first message"),
            ([_chunk("", "a", b"x", True)], "first message"),
            ([files_pb2.WriteFileRequest(name=name)], "first message"),
            ([_chunk(name, "a", b"x", False), _chunk(name, "b", b"y", True)], "'b'"),
            ([_chunk(name, "a", b"x", False)], "without one marked final"),
            ([_chunk(name, "a", b"x", True), _chunk(name, "a", b"y", True)], "nothing may follow"),
        ]
        for messages, fragment in writes:
            await expect(stub.WriteFile(iter(messages)), INVALID, fragment)
        executor = await petri.executor(name)
        assert executor.files == {}


async def test_an_oversized_write_is_cancelled_and_leaves_nothing(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, max_input_bytes=1000) as petri:
        sandbox = await petri.create("small")
        executor = await petri.executor(sandbox.name)

        async def messages() -> AsyncIterator[files_pb2.WriteFileRequest]:
            yield _chunk(sandbox.name, "big", b"x" * 600, False)
            # The executor's call has begun (the cancel below must undo a started write).
            await wait_until(lambda: executor.write_received == 1, "the first chunk")
            yield _chunk(sandbox.name, "big", b"x" * 600, True)

        await expect(
            petri.stub.WriteFile(messages()), grpc.StatusCode.RESOURCE_EXHAUSTED, "1000 bytes"
        )
        assert executor.write_received == 1  # the executor's call began, then was cancelled
        assert executor.files == {}
        info = await petri.stub.WriteFile(iter([_chunk(sandbox.name, "ok", b"x" * 1000, True)]))
        assert info.size == 1000


async def test_files_calls_resume_a_paused_sandbox(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("sleepy")
        await petri.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=sandbox.name))
        assert (await petri.get(sandbox.name)).state == sandbox_pb2.Sandbox.PAUSED
        await petri.stub.ListFiles(files_pb2.ListFilesRequest(name=sandbox.name))
        assert (await petri.get(sandbox.name)).state == sandbox_pb2.Sandbox.RUNNING
        assert (await petri.executor(sandbox.name)).file_calls == ["ListFiles"]


@pytest.mark.parametrize(
    ("chunks", "code", "fragment"),
    [
        # More bytes than the first chunk stated.
        (
            [execution_pb2.FileChunk(path="f", data=b"abcdef", size=3, final=True)],
            grpc.StatusCode.FAILED_PRECONDITION,
            "changed while it was read",
        ),
        # Something after the final chunk.
        (
            [
                execution_pb2.FileChunk(path="f", data=b"ab", size=2, final=True),
                execution_pb2.FileChunk(path="f", data=b"", final=True),
            ],
            grpc.StatusCode.FAILED_PRECONDITION,
            "changed while it was read",
        ),
        # Ended without a final chunk.
        (
            [execution_pb2.FileChunk(path="f", data=b"ab", size=4)],
            grpc.StatusCode.UNAVAILABLE,
            "before its last chunk",
        ),
    ],
)
async def test_a_hostile_executors_chunks_are_refused(
    tmp_path: Path, chunks: list[execution_pb2.FileChunk], code: grpc.StatusCode, fragment: str
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("hostile")
        executor = await petri.executor(sandbox.name)
        executor.read_chunks = chunks
        await expect(_read(petri, sandbox.name, "f"), code, fragment)


async def test_a_dead_executor_terminates_the_sandbox_and_a_deleted_one_is_not_found(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("doomed")
        await petri.runtime.exit(sandbox.uid, exit_code=137)  # kill -9 of the daemon
        await expect(
            petri.stub.ListFiles(files_pb2.ListFilesRequest(name=sandbox.name)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "is TERMINATED: its container was killed by signal 9",
        )
        await expect(
            _read(petri, sandbox.name, "f"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "is TERMINATED",
            "its files cannot be reached",
        )
        await petri.delete(sandbox.name)
        await expect(
            petri.stub.DeleteFile(files_pb2.DeleteFileRequest(name=sandbox.name, path="f")),
            grpc.StatusCode.NOT_FOUND,
            f"sandbox {sandbox.name} was deleted",
        )


async def test_a_write_gone_quiet_holds_the_queue_no_longer_than_the_longest_timeout(
    tmp_path: Path,
) -> None:
    """The executor's deadline ended its call but not the wait for the caller's next chunk:
    a caller that sent one chunk and then nothing held the sandbox's queue for ever, and its
    executions waited behind it."""
    second = timedelta(seconds=1)
    async with fast_petri(tmp_path, max_timeout=second, default_timeout=second) as petri:
        sandbox = await petri.create("quiet")
        writing = petri.stub.WriteFile()
        await writing.write(_chunk(sandbox.name, "f", b"x", False))  # and then nothing
        await asyncio.wait_for(
            expect(writing, grpc.StatusCode.DEADLINE_EXCEEDED, "nothing was written"), 10
        )
        response = await asyncio.wait_for(petri.execute(sandbox.name, "1 + 1"), 10)
        assert not response.HasField("error")
        writing.cancel()


async def test_a_read_gone_quiet_holds_the_queue_no_longer_than_the_longest_timeout(
    tmp_path: Path,
) -> None:
    """A caller that stops taking a big file's chunks leaves the controller waiting to send
    one, where the executor's deadline cannot reach: that wait held the sandbox's queue for
    ever, and its executions waited behind it."""
    second = timedelta(seconds=1)
    async with fast_petri(tmp_path, max_timeout=second, default_timeout=second) as petri:
        sandbox = await petri.create("quiet")
        executor = await petri.executor(sandbox.name)
        piece, count = b"x" * (1 << 20), 64
        executor.read_chunks = [
            execution_pb2.FileChunk(
                path="big", data=piece, size=len(piece) * count if i == 0 else 0, final=i == 63
            )
            for i in range(count)
        ]
        reading = petri.stub.ReadFile(files_pb2.ReadFileRequest(name=sandbox.name, path="big"))
        await reading.read()  # the first chunk, then no more asked for
        response = await asyncio.wait_for(petri.execute(sandbox.name, "1 + 1"), 10)
        assert not response.HasField("error")
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # what was sent, then the status
            while (chunk := await reading.read()) is not grpc.aio.EOF:
                assert isinstance(chunk, execution_pb2.FileChunk) and not chunk.final
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "read it again" in (caught.value.details() or "")
