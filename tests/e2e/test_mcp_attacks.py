"""`petri mcp` against a model that misbehaves: wrong argument types, concurrent calls on one
session, a reset while code runs, and a session sandbox that vanishes between calls."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from typing import TYPE_CHECKING

import pytest
from mcp import Client

from controller.app import Controller
from petri.v1 import sandbox_pb2
from tests.e2e.test_mcp import call, sandboxes_labelled, stdio_server, text_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


async def _wait_for_file(container: str, name: str) -> None:
    """Until the running code has written /workspace/`name` (a signal that it is under way),
    seen from outside: the files tools wait behind the running execution."""
    async with asyncio.timeout(60):
        while True:
            done = await asyncio.to_thread(
                subprocess.run,
                ["podman", "exec", container, "test", "-e", f"/workspace/{name}"],
                capture_output=True,
            )
            if done.returncode == 0:
                return
            await asyncio.sleep(0.1)


async def test_wrong_arguments_concurrent_calls_reset_while_running_and_a_vanished_sandbox(
    controller: Controller, stub: Stub
) -> None:
    tag = uuid.uuid4().hex[:10]
    async with Client(stdio_server(controller, tag)) as client:
        for arguments in (
            {"code": 123},
            {"code": "1", "timeout_seconds": "soon"},
            {"code": "1", "timeout_seconds": "NaN"},
            {"code": "1", "timeout_seconds": -1},
            {},
        ):
            result = await client.call_tool("run_python", arguments)
            assert result.is_error, arguments
        result = await call(client, "upload_file", path="../x", content="x")
        assert result.is_error and "INVALID_ARGUMENT" in text_of(result)

        # Two calls at once on one session: one sandbox, both run (one after the other).
        first, second = await asyncio.gather(
            call(client, "run_python", code="a = 1\na"), call(client, "run_python", code="2")
        )
        assert not first.is_error and not second.is_error, (text_of(first), text_of(second))
        [box] = await sandboxes_labelled(stub, tag)

        # A reset while code runs: the running call fails, the session goes on afresh.
        code = "import time\nopen('started', 'w').close()\ntime.sleep(3600)"
        running = asyncio.create_task(call(client, "run_python", code=code))
        await _wait_for_file(f"petri-{box.uid}", "started")
        assert "deleted" in text_of(await call(client, "reset"))
        interrupted = await running
        assert interrupted.is_error
        assert not (await call(client, "run_python", code="b = 5")).is_error
        assert "result:\n5" in text_of(await call(client, "run_python", code="b"))
        [fresh] = await sandboxes_labelled(stub, tag)
        assert fresh.uid != box.uid

        # The session's sandbox deleted behind its back (as if it expired): one call says so,
        # the next starts a fresh sandbox.
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=fresh.name))
        gone = await call(client, "run_python", code="b")
        assert gone.is_error and "fresh" in text_of(gone)
        after = await call(client, "run_python", code="b")
        assert after.is_error and "NameError" in text_of(after)
        [last] = await sandboxes_labelled(stub, tag)
        assert last.uid not in (box.uid, fresh.uid)
