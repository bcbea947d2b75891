"""Length-prefixed protobuf frames on a pipe between the daemon and its worker.

A frame is a 4-byte big-endian length and that many bytes of a serialized message. The worker
side is blocking (it owns its process); the daemon side reads with asyncio.
"""

import os
import struct
from typing import TYPE_CHECKING

from google.protobuf.message import Message

if TYPE_CHECKING:
    import asyncio

_HEADER = struct.Struct(">I")
# The worker is as hostile as the code it runs: never let it make the daemon allocate more.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(message: Message) -> bytes:
    payload = message.SerializeToString()
    return _HEADER.pack(len(payload)) + payload


def write_frame(fd: int, message: Message) -> None:
    """Writes a whole frame to a blocking file descriptor."""
    view = memoryview(encode(message))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            if chunks:
                raise FrameError("pipe closed in the middle of a frame")
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    """Reads one frame's payload from a blocking file descriptor; None at end of file."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    payload = _read_exactly(fd, size) if size else b""
    if payload is None:
        raise FrameError("pipe closed in the middle of a frame")
    return payload


async def read_frame_async(reader: "asyncio.StreamReader") -> bytes | None:
    """Reads one frame's payload; None at end of stream."""
    # Imported here: the worker, which reads with read_frame, then never imports asyncio
    # (about a quarter of its start's CPU, and memory in every sandbox).
    import asyncio

    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("pipe closed in the middle of a frame") from exc
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise FrameError("pipe closed in the middle of a frame") from exc
