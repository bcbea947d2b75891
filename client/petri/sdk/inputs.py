"""Input file sources as streams of FileChunk messages, read lazily so that a large file is
never held whole in memory: at most two chunks of it at a time."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import BinaryIO, TypeVar

from petri.v1 import execution_pb2

# What a file's content may be given as: bytes; str (written as UTF-8); a path on this machine
# (os.PathLike, read from disk when sent); a binary file object (read from where it stands).
FileSource = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO

CHUNK_SIZE = 1 << 20  # 1 MiB: well under gRPC's 4 MiB message limit, few messages per file

T = TypeVar("T")

__all__ = ["CHUNK_SIZE", "FileSource", "async_iterate", "file_chunks", "files_chunks"]


def _pieces(source: FileSource, chunk_size: int) -> Iterator[bytes]:
    if isinstance(source, str):
        source = source.encode()
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])
        return
    if isinstance(source, os.PathLike):
        with open(source, "rb") as stream:
            yield from _read(stream, chunk_size)
        return
    if hasattr(source, "read"):
        yield from _read(source, chunk_size)
        return
    raise TypeError(
        f"a file's content must be bytes, str, an os.PathLike or a binary file, not "
        f"{type(source).__name__}"
    )


def _read(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while True:
        data = stream.read(chunk_size)
        if not data:
            return
        if not isinstance(data, bytes):
            raise TypeError("a file object given as content must be opened in binary mode")
        yield data


def file_chunks(
    path: str, source: FileSource, chunk_size: int = CHUNK_SIZE
) -> Iterator[execution_pb2.FileChunk]:
    """The chunks of one file, in order, ``final`` on the last (an empty file is one empty
    chunk). A path is opened only when the first chunk is asked for."""
    pending: bytes | None = None
    for data in _pieces(source, chunk_size):
        if pending is not None:
            yield execution_pb2.FileChunk(path=path, data=pending)
        pending = data
    yield execution_pb2.FileChunk(path=path, data=pending or b"", final=True)


def files_chunks(
    files: Mapping[str, FileSource], chunk_size: int = CHUNK_SIZE
) -> Iterator[execution_pb2.FileChunk]:
    """The chunks of every file, one file after the other."""
    for path, source in files.items():
        yield from file_chunks(path, source, chunk_size)


async def async_iterate(iterator: Iterator[T]) -> AsyncIterator[T]:
    """An iterator that reads files, advanced in a thread so the event loop never blocks."""
    while True:
        step = await asyncio.to_thread(lambda: list(itertools.islice(iterator, 1)))
        if not step:
            return
        yield step[0]
