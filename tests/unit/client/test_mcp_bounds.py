"""The MCP tools against a hostile sandbox (floods of images and files, bytes labelled as an
image that are not one) and against a session whose sandbox is replaced during a call."""

from __future__ import annotations

import base64
from typing import Any, cast

import grpc
import pytest
from mcp.server.mcpserver import MCPServer
from mcp_types import ImageContent, TextContent
from starlette.testclient import TestClient

from petri import AsyncClient, AsyncSandbox, Deleted
from petri.mcp.server import http_app, rebinding_protection
from petri.mcp.sessions import SandboxOptions, Sessions
from petri.mcp.tools import (
    MAX_IMAGES,
    MAX_RESULT_CHARS,
    _explain,
    _file_content,
    render_execution,
)
from petri.sdk.execution import Execution, OutputFile, Result
from petri.v1 import sandbox_pb2

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def test_a_flood_of_images_attaches_at_most_max_images() -> None:
    figures = [Result(kind="display", data={"image/png": PNG}) for _ in range(500)]
    rendered = render_execution(Execution(results=figures))
    images = [c for c in rendered.content if isinstance(c, ImageContent)]
    assert len(images) == MAX_IMAGES
    text = rendered.content[0]
    assert isinstance(text, TextContent) and f"only {MAX_IMAGES} images" in text.text


def test_bytes_that_are_not_the_image_they_claim_are_not_attached() -> None:
    fake = Result(
        kind="display",
        data={"text/plain": "<Figure>", "image/png": b"<script>", "image/jpeg": b"GIF89a"},
    )
    rendered = render_execution(Execution(results=[fake]))
    assert not [c for c in rendered.content if isinstance(c, ImageContent)]
    said = cast(TextContent, rendered.content[0]).text
    assert "not a valid image/png" in said and "attached" not in said and "<Figure>" in said
    downloaded = _file_content("x.png", "image/png", b"not a png")
    assert not [c for c in downloaded.content if isinstance(c, ImageContent)]
    webp = b"RIFF\0\0\0\0WEBPVP8 "
    [_, image] = _file_content("x.webp", "image/webp", webp).content
    assert isinstance(image, ImageContent) and base64.b64decode(image.data) == webp


def test_a_flood_of_files_is_listed_within_bounds() -> None:
    files = [
        OutputFile(path=f"{i:04d}" + "x" * 4000, content=b"", mime_type="text/plain")
        for i in range(1000)
    ]
    [text] = render_execution(Execution(files=files)).content
    assert isinstance(text, TextContent)
    assert len(text.text) <= MAX_RESULT_CHARS + 100 and "more" in text.text


def _sandbox(name: str) -> AsyncSandbox:
    return AsyncSandbox(sandbox_pb2.Sandbox(name=name), cast(Any, None), keep=True)


def test_a_failure_on_an_old_sandbox_keeps_the_sessions_new_one() -> None:
    sessions = Sessions(cast(AsyncClient, None), SandboxOptions())
    old, new = _sandbox("projects/p/sandboxes/old"), _sandbox("projects/p/sandboxes/new")
    sessions._sandboxes["s"] = new  # reset() dropped `old`, a later call made `new`
    gone = Deleted("deleted", code=grpc.StatusCode.NOT_FOUND, reason="SANDBOX_DELETED")
    assert "fresh" in _explain(gone, sessions, "s", old)
    assert sessions.current("s") is new
    _explain(gone, sessions, "s", new)
    assert sessions.current("s") is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_http_on_any_loopback_address_refuses_a_foreign_host_header(host: str) -> None:
    app = http_app(MCPServer("t"), host)
    named = f"[{host}]" if ":" in host else host
    with TestClient(app, base_url=f"http://{named}:8000") as http:
        rebound = http.post("/mcp", json={}, headers={"host": "evil.example:8000"})
        assert rebound.status_code in (400, 421) and "Invalid Host" in rebound.text
        local = http.post("/mcp", json={}, headers={"host": f"{named}:8000"})
        assert "Invalid Host" not in local.text
    assert rebinding_protection("0.0.0.0") is None
