"""The files API against a workspace user code booby-trapped, through the real API into real
sandboxes: FIFOs, sockets, unreadable files, the file thread's identity as user code sees it,
forged page tokens, and the queue under calls that go quiet or are cancelled."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

import grpc
import pytest

from petri.v1 import execution_pb2, files_pb2, sandbox_pb2
from tests.e2e.helpers import execute, value_of
from tests.e2e.test_files_api import listing, read, status_of, write

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub
    from tests.conftest import CreateSandbox

pytestmark = pytest.mark.e2e


async def test_fifos_sockets_and_unreadable_files_neither_block_nor_leak(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = sandbox.name
    response = await execute(
        stub,
        name,
        "import os, socket\n"
        "os.mkfifo('fifo'); s = socket.socket(socket.AF_UNIX); s.bind('sock')\n"
        "open('secret', 'w').write('mine'); os.chmod('secret', 0)\n"
        "os.mkdir('locked'); open('locked/f', 'w').write('x'); os.chmod('locked', 0)\n"
        "os.getuid()",
    )
    assert value_of(response) not in (None, "0")
    for path in ("fifo", "sock", "secret", "locked/f"):
        code, details = await asyncio.wait_for(
            status_of(stub.ReadFile(files_pb2.ReadFileRequest(name=name, path=path))), 30
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (path, details)
    code, _ = await status_of(stub.ListFiles(files_pb2.ListFilesRequest(name=name, path="locked")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    await write(stub, name, "secret", b"replaced")  # as user code could: a new file
    listed = {f.path: f.type for f in await listing(stub, name, recursive=True)}
    assert listed["fifo"] == listed["sock"] == files_pb2.FileInfo.OTHER
    # A FIFO replaced by a write, and the daemon still answers.
    await write(stub, name, "fifo", b"now a file")
    assert await read(stub, name, "fifo") == b"now a file"


def _chunk(name: str, path: str, data: bytes, final: bool) -> files_pb2.WriteFileRequest:
    return files_pb2.WriteFileRequest(
        name=name, chunk=execution_pb2.FileChunk(path=path, data=data, final=final)
    )


async def test_user_code_cannot_signal_the_file_thread(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = sandbox.name
    await listing(stub, name)  # the file thread exists from the first call
    response = await execute(
        stub,
        name,
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "mine = {os.getpid(), os.getppid()}\n"
        "reached = []\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try: tids = os.listdir(f'/proc/{pid}/task')\n"
        "    except OSError: continue\n"
        "    for tid in tids:\n"
        "        st = os.stat(f'/proc/{pid}/task/{tid}')\n"
        "        if int(pid) in mine: continue\n"
        "        if libc.syscall(234, int(pid), int(tid), 0) == 0: reached.append((pid, tid))\n"
        "reached",
    )
    assert value_of(response) == "[]"


async def test_forged_page_tokens_are_refused_or_harmless(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = sandbox.name
    for path in ("a", "b", "c"):
        await write(stub, name, path, b"x")
    for token, expected in [
        ("!!!not base64", grpc.StatusCode.INVALID_ARGUMENT),
        ("\u00e9", grpc.StatusCode.INVALID_ARGUMENT),
        ("A" * 100_000, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        code, _ = await status_of(
            stub.ListFiles(files_pb2.ListFilesRequest(name=name, page_token=token))
        )
        assert code == expected, token
    forged = base64.urlsafe_b64encode(b"a").decode()
    page = await stub.ListFiles(files_pb2.ListFilesRequest(name=name, page_token=forged))
    assert [f.path for f in page.files] == ["b", "c"]
    odd = base64.urlsafe_b64encode(b"\xff../..\x00").decode()
    page = await stub.ListFiles(files_pb2.ListFilesRequest(name=name, page_token=odd))
    assert [f.path for f in page.files] == []


async def test_a_quiet_or_cancelled_write_leaves_the_sandbox_usable(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = sandbox.name
    for _ in range(20):
        call = stub.WriteFile()
        await call.write(_chunk(name, "w", b"x" * 1000, False))
        call.cancel()
    call = stub.WriteFile()
    await call.write(_chunk(name, "w", b"x", True))
    call.cancel()  # right at the final chunk, before the half-close
    response = await execute(stub, name, "import os; sorted(os.listdir())")
    assert value_of(response) == "[]"


async def test_a_quiet_files_call_does_not_hold_up_deleting_the_sandbox(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    """A caller may hold the sandbox's queue by going quiet mid-read (as a long execution
    does): deleting the sandbox must not wait for it."""
    sandbox = await create_sandbox()
    name = sandbox.name
    await write(stub, name, "big", b"x" * (8 << 20))
    reading = stub.ReadFile(files_pb2.ReadFileRequest(name=name, path="big"))
    await reading.read()  # the first chunk; the rest is not asked for yet
    await asyncio.wait_for(stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name)), 30)
    code, _ = await status_of(stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name)))
    assert code == grpc.StatusCode.NOT_FOUND
    # The reader, back, gets what was sent, then an error, not a call that never ends
    # (grpc.aio's CancelledError for the executor's closed channel ended our handler).
    with pytest.raises(grpc.aio.AioRpcError):
        while (chunk := await asyncio.wait_for(reading.read(), 30)) is not grpc.aio.EOF:
            assert isinstance(chunk, execution_pb2.FileChunk) and not chunk.final
