"""examples/agent_loop.py (the SDK) and examples/mcp_agent_loop.py (MCP over stdio), run as
scripts against the real controller: each reacts to the planted KeyError and fetches the report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from controller.app import Controller
from petri.v1 import sandbox_pb2
from tests.e2e.client_processes import python
from tests.e2e.helpers import PARENT

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REPORT = "# Revenue by region\n\n- north: 320\n- south: 175\n- east: 50\n"


async def labelled(stub: Stub, value: str) -> list[sandbox_pb2.Sandbox]:
    response = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter=f"labels.example = {value}")
    )
    return list(response.sandboxes)


async def test_agent_loop(controller: Controller, stub: Stub) -> None:
    done = await python(controller, str(EXAMPLES / "agent_loop.py"))
    assert done.code == 0, done.err
    assert "error: KeyError: " in done.out and "revnue" in done.out
    assert "The column is called 'revenue'" in done.out
    assert done.out.endswith(REPORT)
    assert await labelled(stub, "agent-loop") == []


async def test_mcp_agent_loop(controller: Controller, stub: Stub) -> None:
    done = await python(controller, str(EXAMPLES / "mcp_agent_loop.py"))
    assert done.code == 0, done.err
    assert "tools: run_python, upload_file, download_file, list_files, reset" in done.out
    assert "KeyError: " in done.out and "The column is called 'revenue'" in done.out
    assert done.out.endswith(REPORT)
    assert await labelled(stub, "mcp-agent-loop") == []
