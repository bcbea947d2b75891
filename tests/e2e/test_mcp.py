"""`petri mcp` through the official MCP client library: over stdio (a subprocess per client)
and over Streamable HTTP (a server subprocess on a loopback port)."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, ImageContent, TextContent

from controller.app import Controller
from petri.v1 import sandbox_pb2
from tests.e2e.client_processes import PROCESS_TIMEOUT, client_env
from tests.e2e.helpers import PARENT

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOOLS = {"run_python", "upload_file", "download_file", "list_files", "reset"}


def text_of(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def call(client: Client, tool: str, **arguments: object) -> CallToolResult:
    return await client.call_tool(tool, dict(arguments), read_timeout_seconds=PROCESS_TIMEOUT)


async def sandboxes_labelled(stub: Stub, tag: str) -> list[sandbox_pb2.Sandbox]:
    response = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter=f"labels.test = {tag}")
    )
    return list(response.sandboxes)


def stdio_server(controller: Controller, tag: str, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "petri.cli", "mcp", "--label", f"test={tag}", "--ttl", "10m", *extra],
        env=client_env(controller),
    )


async def test_stdio_tools_state_figures_errors_and_reset(
    controller: Controller, stub: Stub
) -> None:
    tag = uuid.uuid4().hex[:10]
    async with Client(stdio_server(controller, tag)) as client:
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == TOOLS
        run_python = next(t for t in tools.tools if t.name == "run_python")
        assert run_python.description and "persist" in run_python.description

        assert not (await call(client, "run_python", code="x = 1")).is_error
        result = await call(client, "run_python", code="print('hi')\nx + 1")
        assert not result.is_error
        assert "stdout:\nhi" in text_of(result) and "result:\n2" in text_of(result)
        # One sandbox for the session, labelled as MCP's.
        [box] = await sandboxes_labelled(stub, tag)
        assert box.labels["created-by"] == "petri-mcp" and box.labels["mcp-session"] == "stdio"

        result = await call(
            client, "run_python", code="import matplotlib.pyplot as plt\nplt.plot([1, 2, 4])"
        )
        assert not result.is_error, text_of(result)
        images = [c for c in result.content if isinstance(c, ImageContent)]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(PNG_SIGNATURE)

        result = await call(client, "run_python", code="def f():\n    return 1 / 0\nf()")
        assert result.is_error
        assert "ZeroDivisionError" in text_of(result) and "return 1 / 0" in text_of(result)

        result = await call(
            client, "run_python", code="import time\ntime.sleep(30)", timeout_seconds=1
        )
        assert result.is_error and "timed out" in text_of(result)

        result = await call(client, "reset")
        assert not result.is_error and "deleted" in text_of(result)
        result = await call(client, "run_python", code="x")
        assert result.is_error and "NameError" in text_of(result)
        [fresh] = await sandboxes_labelled(stub, tag)
        assert fresh.uid != box.uid
    # The server deletes its sandbox when its client goes (--on-exit delete, the default).
    assert await sandboxes_labelled(stub, tag) == []


async def test_stdio_files(controller: Controller, stub: Stub) -> None:
    tag = uuid.uuid4().hex[:10]
    async with Client(stdio_server(controller, tag)) as client:
        result = await call(client, "upload_file", path="data/in.csv", content="a,b\n1,2\n")
        assert not result.is_error, text_of(result)
        result = await call(
            client,
            "upload_file",
            path="blob.bin",
            content=base64.b64encode(b"\x00\xff\x10").decode(),
            encoding="base64",
        )
        assert not result.is_error, text_of(result)
        result = await call(
            client,
            "run_python",
            code="import pandas as pd\nd = pd.read_csv('data/in.csv')\nprint(int(d.b.sum()))\n"
            "_ = open('data/out.txt', 'w').write('out')",
        )
        assert "stdout:\n2" in text_of(result) and "data/out.txt" in text_of(result)

        result = await call(client, "download_file", path="data/out.txt")
        assert (result.is_error, text_of(result)) == (False, "out")
        result = await call(client, "download_file", path="blob.bin")
        assert not result.is_error
        assert text_of(result).endswith(base64.b64encode(b"\x00\xff\x10").decode())

        result = await call(client, "list_files", path="data")
        assert not result.is_error
        assert "data/in.csv" in text_of(result) and "data/out.txt" in text_of(result)
        result = await call(client, "list_files", recursive=True)
        assert "data/" in text_of(result) and "blob.bin" in text_of(result)

        # An image comes back as an image; a text file over 1 MiB is refused with a hint.
        result = await call(
            client,
            "run_python",
            code="import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.savefig('fig.png')\n"
            "_ = open('big.txt', 'w').write('x' * (1 << 20) + 'y')",
        )
        assert not result.is_error, text_of(result)
        result = await call(client, "download_file", path="fig.png")
        images = [c for c in result.content if isinstance(c, ImageContent)]
        assert len(images) == 1 and base64.b64decode(images[0].data).startswith(PNG_SIGNATURE)
        result = await call(client, "download_file", path="big.txt")
        assert result.is_error and "run_python" in text_of(result)

        result = await call(client, "download_file", path="nope.txt")
        assert result.is_error and "NOT_FOUND" in text_of(result)
        result = await call(client, "upload_file", path="x", content="!", encoding="base64")
        assert result.is_error and "base64" in text_of(result)
    assert await sandboxes_labelled(stub, tag) == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def http_server(controller: Controller, stub: Stub) -> AsyncIterator[tuple[str, str]]:
    """A `petri mcp --transport http` subprocess; yields its URL and its sandboxes' label.
    SIGTERM stops it at the end, and it deletes its sandboxes then."""
    tag = uuid.uuid4().hex[:10]
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "petri.cli", "mcp", "--transport", "http", "--port", str(port)),
        *("--label", f"test={tag}", "--ttl", "10m"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=client_env(controller),
    )
    assert process.stderr is not None
    seen = b""
    try:
        while b"Uvicorn running on" not in seen:
            line = await asyncio.wait_for(process.stderr.readline(), PROCESS_TIMEOUT)
            assert line, f"the server exited: {seen.decode()}"
            seen += line
        yield f"http://127.0.0.1:{port}/mcp", tag
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), PROCESS_TIMEOUT)
    assert process.returncode == 0, (seen + rest).decode()
    assert await sandboxes_labelled(stub, tag) == []


async def test_http_one_sandbox_per_session(http_server: tuple[str, str], stub: Stub) -> None:
    url, tag = http_server
    # Sessions are those of the initialize handshake (the 2025 protocol versions).
    async with Client(url, mode="legacy") as first, Client(url, mode="legacy") as second:
        assert {t.name for t in (await first.list_tools()).tools} == TOOLS
        assert not (await call(first, "run_python", code="x = 'first'")).is_error
        assert not (await call(second, "run_python", code="x = 'second'")).is_error
        result = await call(first, "run_python", code="x")
        assert "result:\n'first'" in text_of(result)
        result = await call(second, "run_python", code="x")
        assert "result:\n'second'" in text_of(result)
        boxes = await sandboxes_labelled(stub, tag)
        assert len(boxes) == 2
        assert len({b.labels["mcp-session"] for b in boxes}) == 2


async def test_http_stateless_protocol_shares_the_server_sandbox(
    http_server: tuple[str, str], stub: Stub
) -> None:
    url, tag = http_server
    # The 2026-07-28 protocol has no sessions: its calls share the server's sandbox.
    async with Client(url) as client:
        assert not (await call(client, "run_python", code="y = 41")).is_error
        result = await call(client, "run_python", code="y + 1")
        assert "result:\n42" in text_of(result), text_of(result)
    assert len(await sandboxes_labelled(stub, tag)) == 1


async def test_stdio_on_exit_keep(controller: Controller, stub: Stub) -> None:
    tag = uuid.uuid4().hex[:10]
    async with Client(stdio_server(controller, tag, "--on-exit", "keep")) as client:
        assert not (await call(client, "run_python", code="z = 1")).is_error
    [kept] = await sandboxes_labelled(stub, tag)
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=kept.name))
