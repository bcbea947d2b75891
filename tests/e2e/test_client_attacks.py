"""The client against what a demanding developer expects and a hostile sandbox sends: the
blocking and asyncio SDKs agree, profiles and download progress, and the CLI prints a
sandbox's file names without letting them drive the terminal."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import petri
from controller.app import Controller
from petri import AsyncClient, AsyncSandbox, Client, Sandbox
from petri.v1 import sandbox_pb2
from tests.e2e.client_processes import petri as run_petri
from tests.e2e.helpers import PROJECT

pytestmark = pytest.mark.e2e

# stdout, stderr, a display, a file, then an exception: every field of an Execution.
CODE = (
    "import sys\nprint('out')\nprint('err', file=sys.stderr)\ndisplay({'a': 1})\n"
    "_ = open('made.txt', 'w').write('x')\nraise ValueError('boom')"
)


@pytest.fixture
def client(controller: Controller) -> Iterator[Client]:
    with Client(addr=f"127.0.0.1:{controller.port}", project=PROJECT) as made:
        yield made


@pytest.fixture
async def aclient(controller: Controller) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(addr=f"127.0.0.1:{controller.port}", project=PROJECT) as made:
        yield made


def _fields(ex: petri.Execution) -> tuple[object, ...]:
    error = ex.error
    assert error is not None
    return (
        ex.stdout,
        ex.stderr,
        ex.results,
        (error.kind, error.ename, error.evalue, len(error.traceback), error.traceback[-1]),
        [(f.path, f.content, f.mime_type) for f in ex.files],
        ex.omitted_files,
        ex.namespace_reset,
        ex.output_truncated,
    )


async def test_sync_and_async_agree_on_runs_timeouts_and_profiles(
    client: Client, aclient: AsyncClient
) -> None:
    async with await AsyncSandbox.create(client=aclient) as asb:
        sb = await asyncio.to_thread(Sandbox.connect, asb.sandbox_id, client)
        synced = await asyncio.to_thread(sb.run, CODE)
        awaited = await asb.run(CODE)
        assert _fields(synced) == _fields(awaited)
        assert awaited.execution_count == synced.execution_count + 1

        sleep = "import time\ntime.sleep(60)"
        timed_out = await asyncio.to_thread(sb.run, sleep, timeout=1)
        assert timed_out.error is not None and timed_out.error.kind == "timeout"
        timed_out = await asb.run(sleep, timeout=1)
        assert timed_out.error is not None and timed_out.error.kind == "timeout"

        # Files.download and AsyncFiles.download report the bytes received after each chunk.
        await asb.files.write("big.bin", b"x" * (3 << 20) + b"end")
        seen: list[int] = []
        sink = io.BytesIO()
        info = await asyncio.to_thread(sb.files.download, "big.bin", sink, seen.append)
        assert seen and seen == sorted(seen) and seen[-1] == info.size == (3 << 20) + 3
        aseen: list[int] = []
        await asb.files.download("big.bin", io.BytesIO(), on_progress=aseen.append)
        assert aseen == seen

    sync_profiles = await asyncio.to_thread(client.profiles)
    async_profiles = await aclient.profiles()
    assert sync_profiles == async_profiles
    assert all(isinstance(p, sandbox_pb2.ImageProfile) for p in sync_profiles)
    assert "imageProfiles/test" in [p.name for p in sync_profiles]
    assert sum(p.is_default for p in sync_profiles) == 1


async def test_exec_escapes_the_sandboxs_file_names(
    controller: Controller, sandbox: sandbox_pb2.Sandbox, tmp_path: Path
) -> None:
    name = sandbox.name.rsplit("/", 1)[-1]
    code = "_ = open('a\\x1b]0;owned\\x07\\x1b[2J\\rb.txt', 'w').write('x')"
    done = await run_petri(controller, "exec", name, code, "--save-outputs", str(tmp_path))
    assert done.code == 0, done.err
    assert "\x1b" not in done.err and "\r" not in done.err and "\x07" not in done.err
    assert "a\\x1b]0;owned\\x07\\x1b[2J\\rb.txt" in done.err
    # The file itself is saved under its own (odd, but harmless) name.
    assert (tmp_path / "a\x1b]0;owned\x07\x1b[2J\rb.txt").read_text() == "x"
