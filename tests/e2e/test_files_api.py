"""The files API outside executions (ListFiles, ReadFile, WriteFile, DeleteFile): through the
real API into real sandboxes, byte-exact both ways, in the sandbox's queue with its
executions, on a PAUSED sandbox, and safe in a workspace user code booby-trapped."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from petri.sdk.errors import error_from_rpc
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2
from tests.e2e.helpers import execute, value_of

if TYPE_CHECKING:
    from controller.app import Controller
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub
    from tests.conftest import CreateSandbox

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def _pattern(size: int, seed: bytes = b"petri") -> Iterator[bytes]:
    """`size` bytes in 1 MiB pieces, made as they are sent (never all in memory)."""
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    for start in range(0, size, MiB):
        piece = block[: min(MiB, size - start)]
        yield bytes([start // MiB % 251]) + piece[1:] if piece else piece


def _requests(
    name: str, path: str, pieces: Iterator[bytes]
) -> Iterator[files_pb2.WriteFileRequest]:
    previous: bytes | None = None
    for piece in pieces:
        if previous is not None:
            yield files_pb2.WriteFileRequest(
                name=name, chunk=execution_pb2.FileChunk(path=path, data=previous)
            )
        previous = piece
    yield files_pb2.WriteFileRequest(
        name=name, chunk=execution_pb2.FileChunk(path=path, data=previous or b"", final=True)
    )


async def write(stub: Stub, name: str, path: str, data: bytes) -> files_pb2.FileInfo:
    pieces = (data[i : i + MiB] for i in range(0, len(data), MiB))
    info: files_pb2.FileInfo = await stub.WriteFile(_requests(name, path, pieces))
    return info


async def read(stub: Stub, name: str, path: str) -> bytes:
    call = stub.ReadFile(files_pb2.ReadFileRequest(name=name, path=path))
    chunks = [chunk async for chunk in call]
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    data = b"".join(c.data for c in chunks)
    assert chunks[0].size == len(data)
    return data


async def listing(
    stub: Stub, name: str, path: str = "", recursive: bool = False
) -> list[files_pb2.FileInfo]:
    files: list[files_pb2.FileInfo] = []
    token = ""
    while True:
        page = await stub.ListFiles(
            files_pb2.ListFilesRequest(
                name=name, path=path, recursive=recursive, page_token=token, page_size=2
            )
        )
        files += page.files
        token = page.next_page_token
        if not token:
            return files


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a unary or a streaming call fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return caught.value.code(), caught.value.details() or ""


async def test_write_list_read_back_and_code_sees_it_as_its_own(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    data = bytes(range(256)) * 12289  # 3 MiB and a bit: several chunks
    info = await write(stub, sandbox.name, "data/blob.bin", data)
    assert (info.path, info.size, info.type) == ("data/blob.bin", len(data), info.REGULAR)
    assert info.mime_type == "application/octet-stream"
    await write(stub, sandbox.name, "empty.txt", b"")
    assert [f.path for f in await listing(stub, sandbox.name, recursive=True)] == [
        "data",
        "data/blob.bin",
        "empty.txt",
    ]
    assert await read(stub, sandbox.name, "data/blob.bin") == data
    assert await read(stub, sandbox.name, "empty.txt") == b""
    await write(stub, sandbox.name, "data/blob.bin", b"replaced")  # replacing a file is fine
    response = await execute(
        stub,
        sandbox.name,
        "import os; s = os.stat('data/blob.bin'); d = os.stat('data')\n"
        "(open('data/blob.bin', 'rb').read(), s.st_uid == d.st_uid == os.getuid())",
    )
    assert value_of(response) == "(b'replaced', True)"


async def test_a_100_mib_file_streams_both_ways(
    stub: Stub, sandbox: sandbox_pb2.Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    size = 100 * MiB
    sent = hashlib.sha256()
    pieces = list(_pattern(size))  # 100 pieces that share one buffer's worth of pattern
    for piece in pieces:
        sent.update(piece)
    began = time.monotonic()
    info = await stub.WriteFile(_requests(sandbox.name, "big.bin", iter(pieces)))
    wrote = time.monotonic() - began
    assert info.size == size
    began = time.monotonic()
    received = hashlib.sha256()
    first_at = last_at = 0.0
    count = 0
    async for chunk in stub.ReadFile(files_pb2.ReadFileRequest(name=sandbox.name, path="big.bin")):
        if count == 0:
            first_at = time.monotonic() - began
            assert chunk.size == size
        received.update(chunk.data)
        count += 1
        last_at = time.monotonic() - began
    assert received.digest() == sent.digest()
    assert count >= 100 and first_at < last_at / 4  # streamed: the first came long before
    with capsys.disabled():
        print(
            f"\n100 MiB through the API: write {wrote:.2f} s, read {last_at:.2f} s "
            f"(first of {count} chunks after {first_at * 1000:.0f} ms)"
        )
    # One byte more than the limit: refused, and nothing written.
    code, details = await status_of(
        stub.WriteFile(_requests(sandbox.name, "too-big.bin", iter([*pieces, b"x"])))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "too-big.bin" not in [f.path for f in await listing(stub, sandbox.name)]


async def test_a_file_code_made_is_read_without_running_code(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "open('made.txt', 'w').write('by code\\n' * 1000)")
    await execute(stub, sandbox.name, "x = 1")
    await execute(stub, sandbox.name, "y = 2")
    before = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert await read(stub, sandbox.name, "made.txt") == b"by code\n" * 1000
    after = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert after.execution_count == before.execution_count == 3


async def test_a_write_sent_during_an_execution_waits_for_it(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    code = (
        "import time; print('started', flush=True); time.sleep(1.5)\n"
        "open('race.txt', 'w').write('code')"
    )

    async def requests() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
        start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code=code)
        start.timeout.FromSeconds(60)
        yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

    call = stub.StreamExecuteCode(requests())
    first = await call.read()
    assert isinstance(first, sandbox_pb2.StreamExecuteCodeResponse)
    assert first.stdout.startswith("started")  # the execution holds the sandbox's queue now
    finished: list[float] = []

    async def drain() -> None:
        while await call.read() != grpc.aio.EOF:
            pass
        finished.append(time.monotonic())

    draining = asyncio.ensure_future(drain())
    await write(stub, sandbox.name, "race.txt", b"api")
    wrote_at = time.monotonic()
    await draining
    assert finished[0] <= wrote_at  # the write waited for the execution's result
    assert await read(stub, sandbox.name, "race.txt") == b"api"


async def test_files_calls_resume_a_paused_sandbox(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "open('kept.txt', 'w').write('still here')")
    paused = await stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=sandbox.name))
    assert paused.state == sandbox_pb2.Sandbox.PAUSED
    assert await read(stub, sandbox.name, "kept.txt") == b"still here"
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert got.state == sandbox_pb2.Sandbox.RUNNING
    await stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=sandbox.name))
    await write(stub, sandbox.name, "new.txt", b"written while paused")
    response = await execute(stub, sandbox.name, "open('new.txt').read()")
    assert value_of(response) == "'written while paused'"


async def test_each_error_status(stub: Stub, sandbox: sandbox_pb2.Sandbox) -> None:
    name = sandbox.name
    await execute(stub, name, "import os; os.makedirs('dir/sub'); open('file', 'w').write('x')")

    def read_call(path: str, of: str = name) -> object:
        return stub.ReadFile(files_pb2.ReadFileRequest(name=of, path=path))

    cases: list[tuple[object, grpc.StatusCode, str]] = [
        (read_call("missing"), grpc.StatusCode.NOT_FOUND, f"no file 'missing' in sandbox {name}"),
        (
            stub.ListFiles(files_pb2.ListFilesRequest(name=name, path="nodir")),
            grpc.StatusCode.NOT_FOUND,
            "no file 'nodir'",
        ),
        (read_call("dir"), grpc.StatusCode.FAILED_PRECONDITION, "a directory"),
        (
            stub.ListFiles(files_pb2.ListFilesRequest(name=name, path="file")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not a directory",
        ),
        (
            stub.DeleteFile(files_pb2.DeleteFileRequest(name=name, path="dir")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "recursive",
        ),
        (
            stub.WriteFile(_requests(name, "dir", iter([b"x"]))),
            grpc.StatusCode.FAILED_PRECONDITION,
            "is a directory",
        ),
        (read_call("../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        (read_call("file/x"), grpc.StatusCode.INVALID_ARGUMENT, "a file"),
        (
            read_call("x", "projects/e2e/sandboxes/no-such-sandbox"),
            grpc.StatusCode.NOT_FOUND,
            "sandbox projects/e2e/sandboxes/no-such-sandbox does not exist",
        ),
    ]
    for call, code, fragment in cases:
        got, details = await status_of(call)
        assert (got, fragment in details) == (code, True), details

    # A missing file and a missing sandbox are both NOT_FOUND: the error details tell them apart.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.ReadFile(files_pb2.ReadFileRequest(name=name, path="missing")):
            pass
    error = error_from_rpc(caught.value)
    assert (error.reason, error.metadata) == ("FILE_NOT_FOUND", {"path": "missing"})


async def test_a_name_that_is_not_utf8_is_listed_escaped(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "open(b'caf\\xe9.txt', 'w').write('x')")
    assert [f.path for f in await listing(stub, sandbox.name)] == ["caf\\xe9.txt"]


async def test_delete_recursive_and_a_deep_tree(stub: Stub, sandbox: sandbox_pb2.Sandbox) -> None:
    await execute(
        stub,
        sandbox.name,
        "import os\n"
        "os.makedirs('tree/a/b'); open('tree/a/b/f', 'w').write('x'); open('tree/g', 'w')\n"
        "fd = os.open('.', os.O_RDONLY)\n"
        "for _ in range(1500):\n"
        "    os.mkdir('d', dir_fd=fd); new = os.open('d', os.O_RDONLY, dir_fd=fd)\n"
        "    os.close(fd); fd = new\n"
        "os.close(fd)",
    )
    deep = await stub.ListFiles(
        files_pb2.ListFilesRequest(name=sandbox.name, path="", recursive=True, page_size=10_000)
    )
    assert 60 < len(deep.files) < 100  # listed to its depth limit, not 1500 levels down
    await stub.DeleteFile(files_pb2.DeleteFileRequest(name=sandbox.name, path="d", recursive=True))
    await stub.DeleteFile(
        files_pb2.DeleteFileRequest(name=sandbox.name, path="tree", recursive=True)
    )
    assert await listing(stub, sandbox.name, recursive=True) == []
    code, _ = await status_of(
        stub.DeleteFile(files_pb2.DeleteFileRequest(name=sandbox.name, path="tree"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    await stub.DeleteFile(
        files_pb2.DeleteFileRequest(name=sandbox.name, path="tree", allow_missing=True)
    )


async def test_a_symlink_out_of_the_workspace_is_neither_read_nor_followed(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = sandbox.name
    await execute(
        stub, name, "import os; os.symlink('/etc/passwd', 'pw'); os.symlink('/etc', 'etc')"
    )
    listed = {f.path: f for f in await listing(stub, name, recursive=True)}
    assert sorted(listed) == ["etc", "pw"]  # listed, not followed
    assert listed["pw"].type == files_pb2.FileInfo.SYMLINK
    assert listed["pw"].size == len("/etc/passwd")
    cases: list[tuple[object, grpc.StatusCode]] = [
        (
            stub.ReadFile(files_pb2.ReadFileRequest(name=name, path="pw")),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            stub.ReadFile(files_pb2.ReadFileRequest(name=name, path="etc/passwd")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            stub.ListFiles(files_pb2.ListFilesRequest(name=name, path="etc")),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            stub.WriteFile(_requests(name, "etc/evil", iter([b"x"]))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (stub.WriteFile(_requests(name, "pw", iter([b"x"]))), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        got, details = await status_of(call)
        assert got == code, details
    await stub.DeleteFile(files_pb2.DeleteFileRequest(name=name, path="pw"))  # the link only
    response = await execute(stub, name, "import os; (os.path.exists('/etc/passwd'), os.listdir())")
    assert value_of(response) == "(True, ['etc'])"


async def test_the_files_api_acts_as_user_code_under_gvisor(
    stub: Stub, create_sandbox: CreateSandbox, controller: Controller
) -> None:
    """The file thread takes user code's ids with raw per-thread system calls: gVisor's own
    kernel must honour them as Linux does (files owned by user code, root elsewhere)."""
    if controller.gvisor_service is None:
        if os.environ.get("PETRI_REQUIRE_GVISOR"):
            pytest.fail("PETRI_REQUIRE_GVISOR is set but runsc is not installed")
        pytest.skip("gVisor's runsc is not installed on this host (apt-get install runsc)")
    sandbox = await create_sandbox(
        spec=sandbox_pb2.SandboxSpec(runtime=sandbox_pb2.SandboxSpec.GVISOR)
    )
    await write(stub, sandbox.name, "sub/f.txt", b"under gvisor")
    assert await read(stub, sandbox.name, "sub/f.txt") == b"under gvisor"
    response = await execute(
        stub,
        sandbox.name,
        "import os; s = os.stat('sub/f.txt'); d = os.stat('sub')\n"
        "s.st_uid == d.st_uid == os.getuid() != 0",
    )
    assert value_of(response) == "True"
    await stub.DeleteFile(
        files_pb2.DeleteFileRequest(name=sandbox.name, path="sub", recursive=True)
    )
    assert await listing(stub, sandbox.name) == []
