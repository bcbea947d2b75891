"""A sandbox's /workspace outside executions: ``sb.files`` (:class:`Files`, blocking) and
``sb.files`` of an AsyncSandbox (:class:`AsyncFiles`). Reads and writes stream in chunks."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO, Literal

import grpc

from petri.sdk.errors import error_from_rpc
from petri.sdk.inputs import FileSource, async_iterate
from petri.sdk.requests import ProgressCallback, write_requests
from petri.v1 import execution_pb2, files_pb2

if TYPE_CHECKING:
    from petri.sdk.connection import AsyncClient, Client

__all__ = ["AsyncFiles", "FileInfo", "Files"]

FileType = Literal["file", "directory", "symlink", "other"]
_TYPES: dict[int, FileType] = {
    files_pb2.FileInfo.REGULAR: "file",
    files_pb2.FileInfo.DIRECTORY: "directory",
    files_pb2.FileInfo.SYMLINK: "symlink",
}
_ChunkSink = Callable[[execution_pb2.FileChunk], object]
# A read's deadline: long enough for 100 MiB over a slow link.
TRANSFER_TIMEOUT = 600.0


@dataclass(frozen=True)
class FileInfo:
    """A file or directory under /workspace. ``path`` is relative to /workspace; ``mode`` the
    permission bits; ``modify_time`` None when the server did not say (e.g. after a download)."""

    path: str
    type: FileType
    size: int
    mode: int = 0
    modify_time: datetime | None = None
    mime_type: str = ""

    @classmethod
    def from_proto(cls, info: files_pb2.FileInfo) -> FileInfo:
        return cls(
            path=info.path,
            type=_TYPES.get(info.type, "other"),
            size=info.size,
            mode=info.mode,
            modify_time=(
                info.modify_time.ToDatetime(tzinfo=UTC) if info.HasField("modify_time") else None
            ),
            mime_type=info.mime_type,
        )

    @classmethod
    def from_chunk(cls, path: str, chunk: execution_pb2.FileChunk | None, size: int) -> FileInfo:
        return cls(
            path=path,
            type="file",
            size=size,
            mime_type=chunk.mime_type if chunk is not None else "",
        )


# The server's largest page of ListFiles.
_MAX_PAGE_SIZE = 10_000


def _list_request(
    name: str, path: str, recursive: bool, token: str, limit: int | None
) -> files_pb2.ListFilesRequest:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    return files_pb2.ListFilesRequest(
        name=name,
        path=path,
        recursive=recursive,
        page_token=token,
        page_size=0 if limit is None else min(limit, _MAX_PAGE_SIZE),
    )


@contextlib.contextmanager
def _destination(dest: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(dest, str | os.PathLike):
        with open(dest, "wb") as out:
            yield out
    else:
        yield dest


class Files:
    """The files of one sandbox's /workspace (blocking calls). Get it as ``sandbox.files``."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    def __repr__(self) -> str:
        return f"<Files of {self._name}>"

    def list(
        self, path: str = "", recursive: bool = False, limit: int | None = None
    ) -> list[FileInfo]:
        """The entries of directory ``path`` ("" is /workspace), or everything beneath it with
        ``recursive`` (symlinks listed, not followed). Sorted by path. With ``limit``, the first
        ``limit`` entries only, and no page fetched beyond them (a sandbox may hold millions)."""
        found: list[FileInfo] = []
        token = ""
        while True:
            response = self._client.call(
                self._client.stub.ListFiles,
                _list_request(self._name, path, recursive, token, limit),
                retry=True,
            )
            found.extend(FileInfo.from_proto(info) for info in response.files)
            token = response.next_page_token
            if not token or (limit is not None and len(found) >= limit):
                return found[:limit]

    def _chunks(self, path: str) -> Iterator[execution_pb2.FileChunk]:
        request = files_pb2.ReadFileRequest(name=self._name, path=path)
        stream = self._client.stub.ReadFile(
            request, timeout=TRANSFER_TIMEOUT, metadata=self._client.metadata
        )
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            stream.cancel()

    def read(self, path: str) -> bytes:
        """The whole content of the regular file ``path`` (for a big one, :meth:`download`
        holds one chunk at a time)."""
        # BytesIO hands its buffer over without a copy: about the file's size in memory, where
        # joining the chunks would hold them and the joined copy, twice the size, at the end.
        buffer = io.BytesIO()
        self.download(path, buffer)
        return buffer.getvalue()

    def download(
        self,
        path: str,
        dest: str | os.PathLike[str] | BinaryIO,
        on_progress: ProgressCallback | None = None,
    ) -> FileInfo:
        """Streams the file ``path`` into ``dest`` (a local path, created or replaced, or a
        binary file object), a chunk at a time. ``on_progress(bytes_received)`` is called
        after each chunk."""
        first: execution_pb2.FileChunk | None = None
        size = 0
        with _destination(dest) as out:
            for chunk in self._chunks(path):
                first = first or chunk
                out.write(chunk.data)
                size += len(chunk.data)
                if on_progress is not None:
                    on_progress(size)
        return FileInfo.from_chunk(path, first, size)

    def write(
        self, path: str, data: FileSource, on_progress: ProgressCallback | None = None
    ) -> FileInfo:
        """Writes ``data`` (bytes, str as UTF-8, a local path read in chunks, or a binary file
        object) to ``path``, creating its directories and replacing a file that is there.
        ``on_progress(bytes_sent)`` is called after each chunk."""
        requests = write_requests(self._name, path, data, on_progress)
        try:
            info = self._client.stub.WriteFile(
                requests, timeout=TRANSFER_TIMEOUT, metadata=self._client.metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return FileInfo.from_proto(info)

    def remove(self, path: str, recursive: bool = False, missing_ok: bool = False) -> None:
        """Removes a file or symlink, or with ``recursive`` a directory and its content.
        NotFound when it does not exist, unless ``missing_ok``."""
        self._client.call(
            self._client.stub.DeleteFile,
            files_pb2.DeleteFileRequest(
                name=self._name, path=path, recursive=recursive, allow_missing=missing_ok
            ),
        )


class AsyncFiles:
    """The files of one sandbox's /workspace (coroutines). Get it as ``sandbox.files``."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self._client = client
        self._name = name

    def __repr__(self) -> str:
        return f"<AsyncFiles of {self._name}>"

    async def list(
        self, path: str = "", recursive: bool = False, limit: int | None = None
    ) -> list[FileInfo]:
        """As :meth:`Files.list`."""
        found: list[FileInfo] = []
        token = ""
        while True:
            response = await self._client.call(
                self._client.stub.ListFiles,
                _list_request(self._name, path, recursive, token, limit),
                retry=True,
            )
            found.extend(FileInfo.from_proto(info) for info in response.files)
            token = response.next_page_token
            if not token or (limit is not None and len(found) >= limit):
                return found[:limit]

    async def read(self, path: str) -> bytes:
        """As :meth:`Files.read`."""
        buffer = io.BytesIO()
        await self._stream(path, lambda chunk: buffer.write(chunk.data))
        return buffer.getvalue()

    async def _stream(
        self, path: str, take: _ChunkSink
    ) -> tuple[execution_pb2.FileChunk | None, int]:
        call = self._client.stub.ReadFile(
            files_pb2.ReadFileRequest(name=self._name, path=path),
            timeout=TRANSFER_TIMEOUT,
            metadata=self._client.metadata,
        )
        first: execution_pb2.FileChunk | None = None
        size = 0
        try:
            async for chunk in call:
                first = first or chunk
                size += len(chunk.data)
                take(chunk)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
        return first, size

    async def download(
        self,
        path: str,
        dest: str | os.PathLike[str] | BinaryIO,
        on_progress: ProgressCallback | None = None,
    ) -> FileInfo:
        """As :meth:`Files.download` (the local file is written in the event loop's thread, a
        chunk at a time)."""
        received = 0

        def take(chunk: execution_pb2.FileChunk) -> None:
            nonlocal received
            out.write(chunk.data)
            received += len(chunk.data)
            if on_progress is not None:
                on_progress(received)

        with _destination(dest) as out:
            first, size = await self._stream(path, take)
        return FileInfo.from_chunk(path, first, size)

    async def write(
        self, path: str, data: FileSource, on_progress: ProgressCallback | None = None
    ) -> FileInfo:
        """As :meth:`Files.write`; local files are read in a worker thread."""
        requests = async_iterate(write_requests(self._name, path, data, on_progress))
        try:
            info = await self._client.stub.WriteFile(
                requests, timeout=TRANSFER_TIMEOUT, metadata=self._client.metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return FileInfo.from_proto(info)

    async def remove(self, path: str, recursive: bool = False, missing_ok: bool = False) -> None:
        """As :meth:`Files.remove`."""
        await self._client.call(
            self._client.stub.DeleteFile,
            files_pb2.DeleteFileRequest(
                name=self._name, path=path, recursive=recursive, allow_missing=missing_ok
            ),
        )
