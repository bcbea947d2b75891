"""Files.list(limit=) stops fetching pages once it has enough: a sandbox may hold millions of
files, and the MCP server lists only the first thousand."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from petri.sdk.files import AsyncFiles, Files
from petri.v1 import files_pb2


class _Pages:
    """ListFiles over an endless directory, pages of the size asked (1000 by default)."""

    def __init__(self) -> None:
        self.requests: list[files_pb2.ListFilesRequest] = []

    def ListFiles(self, request: files_pb2.ListFilesRequest) -> files_pb2.ListFilesResponse:
        self.requests.append(request)
        start = int(request.page_token or 0)
        size = request.page_size or 1000
        infos = [files_pb2.FileInfo(path=f"f{i:07d}") for i in range(start, start + size)]
        return files_pb2.ListFilesResponse(files=infos, next_page_token=str(start + size))


class _Client:
    def __init__(self) -> None:
        self.stub = _Pages()

    def call(self, method: Any, request: Any, **_: object) -> Any:
        return method(request)


class _AsyncClient(_Client):
    async def call(self, method: Any, request: Any, **_: object) -> Any:
        return method(request)


def test_a_limit_fetches_only_the_pages_it_needs() -> None:
    client = _Client()
    found = Files(cast(Any, client), "projects/p/sandboxes/x").list(recursive=True, limit=1001)
    assert len(found) == 1001 and found[-1].path == "f0001000"
    assert [r.page_size for r in client.stub.requests] == [1001]

    aclient = _AsyncClient()
    files = AsyncFiles(cast(Any, aclient), "projects/p/sandboxes/x")
    found = asyncio.run(files.list(limit=25_000))
    assert len(found) == 25_000
    assert [r.page_size for r in aclient.stub.requests] == [10_000] * 3
    with pytest.raises(ValueError, match="at least 1"):
        Files(cast(Any, client), "projects/p/sandboxes/x").list(limit=0)
