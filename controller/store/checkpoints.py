"""Checkpoints on disk: one file per sandbox, the executor's Checkpoint messages as it sent them.

The controller never looks inside a checkpoint's namespace or archive: user code made them,
and only the sandbox's own worker (the namespace) and its own uid's tar (the archive) read them.
A file is the header (which names the sandbox), then each CheckpointChunk as a 4-byte
big-endian length, the CRC-32 of its bytes and its bytes, the summary last: a file damaged on
disk, or another sandbox's copied over it, is refused, never restored. It is written to a
temporary file, synced and renamed over the previous one: a crash during a write leaves the
previous checkpoint whole (and a temporary file that the next start removes).
"""

import asyncio
import contextlib
import os
import secrets
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from controller.errors import ResourceExhausted
from controller.units import format_size
from petri.protocol import CHECKPOINT_CHUNK_BYTES, CHECKPOINT_VERSION
from petri.v1 import executor_pb2

T = TypeVar("T")
MAGIC = b"PETRICKP"
FORMAT = 2
_HEADER = struct.Struct(">8sII64s")  # magic, format, checkpoint version, the sandbox's uid
_FRAME = struct.Struct(">II")  # a chunk's length and CRC-32
# A chunk, or a summary with up to a thousand lost names.
MAX_FRAME_BYTES = CHECKPOINT_CHUNK_BYTES + (1 << 20)
SUFFIX = ".ckpt"
# A checkpoint moved to another node goes as its file's bytes, this many per message.
TRANSFER_CHUNK_BYTES = 1 << 20
TEMPORARY = ".tmp"


class CheckpointIncomplete(Exception):
    """The executor's messages ended before the summary: nothing was kept."""


class CheckpointUnreadable(Exception):
    """A checkpoint is missing, damaged or of another format; the message says which."""


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"<CheckpointStore {self.root}>"

    def open(self) -> None:
        """Makes the directory, and removes what writes cut short by a crash left."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.root.glob(f"*{TEMPORARY}"):
            leftover.unlink(missing_ok=True)

    def path(self, uid: str) -> Path:
        return self.root / f"{uid}{SUFFIX}"

    def exists(self, uid: str) -> bool:
        return self.path(uid).is_file()

    def uids(self) -> list[str]:
        """The sandboxes that have a checkpoint file here."""
        return [path.name.removesuffix(SUFFIX) for path in self.root.glob(f"*{SUFFIX}")]

    async def remove(self, uid: str) -> None:
        await asyncio.to_thread(self.path(uid).unlink, True)

    async def write(
        self, uid: str, chunks: AsyncIterator[executor_pb2.CheckpointChunk], max_bytes: int
    ) -> tuple[executor_pb2.CheckpointSummary, int]:
        """Writes the checkpoint the messages make, replacing the sandbox's previous one once
        it is whole and on disk; returns its summary and its size in bytes.

        ResourceExhausted when it cannot be written (the disk is full: the OS's words) or
        passes `max_bytes`; CheckpointIncomplete when the messages end without a summary;
        whatever `chunks` raises. In every case the previous checkpoint stays as it was."""
        final = self.path(uid)
        temporary = self.root / f"{uid}.{secrets.token_hex(4)}{TEMPORARY}"
        try:
            file = await _on_disk(_create, temporary)
            try:
                summary, size = await self._write_all(uid, file, chunks, max_bytes)
                await _on_disk(_sync, file)
                await _on_disk(file.close)
            except BaseException:
                with contextlib.suppress(OSError):  # flushing what is left: the disk is full
                    file.close()
                raise
            await _on_disk(_publish, temporary, final)
            return summary, size
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    async def _write_all(
        self,
        uid: str,
        file: BinaryIO,
        chunks: AsyncIterator[executor_pb2.CheckpointChunk],
        max_bytes: int,
    ) -> tuple[executor_pb2.CheckpointSummary, int]:
        size = _HEADER.size
        await _on_disk(file.write, _HEADER.pack(MAGIC, FORMAT, CHECKPOINT_VERSION, uid.encode()))
        async for chunk in chunks:
            data = chunk.SerializeToString()
            size += _FRAME.size + len(data)
            if size > max_bytes:
                raise ResourceExhausted(
                    f"the checkpoint passed the limit of {format_size(max_bytes)} per sandbox "
                    "(its namespace and its files)"
                )
            await _on_disk(_write_frame, file, data)
            if chunk.HasField("summary"):
                return chunk.summary, size
        raise CheckpointIncomplete("the executor's checkpoint ended before its summary")

    async def read(self, uid: str) -> AsyncIterator[executor_pb2.CheckpointChunk]:
        """The checkpoint's messages, in order, the summary last; CheckpointUnreadable when the
        file is missing, damaged, another sandbox's, or of another checkpoint version."""
        path = self.path(uid)
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise CheckpointUnreadable(f"no checkpoint: {exc.strerror or exc}") from exc
        with file:
            _check_header(await asyncio.to_thread(file.read, _HEADER.size), uid)
            while True:
                chunk = await asyncio.to_thread(_read_frame, file)
                if chunk is None:
                    raise CheckpointUnreadable("the checkpoint file ends before its summary")
                yield chunk
                if chunk.HasField("summary"):
                    return

    # --- moving a checkpoint to another node, as its bytes on disk ------------------------

    async def send(self, uid: str) -> AsyncIterator[bytes]:
        """The checkpoint file's bytes, TRANSFER_CHUNK_BYTES at a time (never the whole file
        in memory); CheckpointUnreadable when there is none."""
        try:
            file = await asyncio.to_thread(self.path(uid).open, "rb")
        except OSError as exc:
            raise CheckpointUnreadable(f"no checkpoint: {exc.strerror or exc}") from exc
        with file:
            while True:
                data = await asyncio.to_thread(file.read, TRANSFER_CHUNK_BYTES)
                if not data:
                    return
                yield data

    async def receive(self, uid: str, data: AsyncIterator[bytes], max_bytes: int) -> int:
        """Writes a checkpoint file that another node sent (send's bytes) as the sandbox's,
        once it is whole and on disk and it reads as a checkpoint of sandbox `uid` (its header,
        every chunk's CRC-32, the summary last and nothing after); returns its size.
        ResourceExhausted past `max_bytes` or when the disk is full; CheckpointUnreadable when
        it does not read so. In every case nothing is kept but a whole checkpoint."""
        final = self.path(uid)
        temporary = self.root / f"{uid}.{secrets.token_hex(4)}{TEMPORARY}"
        try:
            file = await _on_disk(_create, temporary)
            size = 0
            try:
                async for piece in data:
                    size += len(piece)
                    if size > max_bytes:
                        raise ResourceExhausted(
                            f"the checkpoint passed the limit of {format_size(max_bytes)} for "
                            "this sandbox"
                        )
                    await _on_disk(file.write, piece)
                await _on_disk(_sync, file)
                await _on_disk(file.close)
            except BaseException:
                with contextlib.suppress(OSError):
                    file.close()
                raise
            await asyncio.to_thread(_verify, temporary, uid)
            await _on_disk(_publish, temporary, final)
            return size
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)


def _verify(path: Path, uid: str) -> None:
    """Reads a whole checkpoint file as read() would, and that nothing follows its summary;
    CheckpointUnreadable otherwise."""
    with path.open("rb") as file:
        _check_header(file.read(_HEADER.size), uid)
        while True:
            chunk = _read_frame(file)
            if chunk is None:
                raise CheckpointUnreadable("the checkpoint file ends before its summary")
            if chunk.HasField("summary"):
                break
        if file.read(1):
            raise CheckpointUnreadable("the checkpoint file goes on after its summary")


def _check_header(header: bytes, uid: str) -> None:
    if len(header) != _HEADER.size and header.startswith(MAGIC):
        raise CheckpointUnreadable("the checkpoint file is cut short")
    if len(header) != _HEADER.size:
        raise CheckpointUnreadable("the file is not a checkpoint of this format")
    magic, version, checkpoint_version, owner = _HEADER.unpack(header)
    if magic != MAGIC or version != FORMAT:
        raise CheckpointUnreadable("the file is not a checkpoint of this format")
    if owner.rstrip(b"\0") != uid.encode():
        raise CheckpointUnreadable("the file is another sandbox's checkpoint")
    if checkpoint_version != CHECKPOINT_VERSION:
        raise CheckpointUnreadable(
            f"the checkpoint is of version {checkpoint_version}; this controller's "
            f"sandboxes restore version {CHECKPOINT_VERSION}"
        )


async def _on_disk(operation: Callable[..., T], *args: Any) -> T:
    """A file operation, off the event loop; its OSError (the disk is full...) as the
    caller's error. (Errors of the executor's stream are not disk errors: not caught here.)"""
    try:
        return await asyncio.to_thread(operation, *args)
    except OSError as exc:
        raise ResourceExhausted(
            f"the checkpoint could not be written to disk: {exc.strerror or exc}"
        ) from exc


def _create(path: Path) -> BinaryIO:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(descriptor, "wb")


def _sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


def _publish(temporary: Path, final: Path) -> None:
    """Renames the whole, synced file over the previous checkpoint, and syncs the directory
    so that the rename outlives a crash."""
    os.replace(temporary, final)
    directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_frame(file: BinaryIO, data: bytes) -> None:
    file.write(_FRAME.pack(len(data), zlib.crc32(data)) + data)


def _read_frame(file: BinaryIO) -> executor_pb2.CheckpointChunk | None:
    prefix = file.read(_FRAME.size)
    if not prefix:
        return None
    if len(prefix) != _FRAME.size:
        raise CheckpointUnreadable("the checkpoint file is cut short")
    length, checksum = _FRAME.unpack(prefix)
    if length > MAX_FRAME_BYTES:
        raise CheckpointUnreadable(f"the checkpoint file holds a frame of {length} bytes")
    data = file.read(length)
    if len(data) != length:
        raise CheckpointUnreadable("the checkpoint file is cut short")
    if zlib.crc32(data) != checksum:
        raise CheckpointUnreadable("the checkpoint file is damaged: a chunk's checksum is wrong")
    try:
        return executor_pb2.CheckpointChunk.FromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise CheckpointUnreadable(f"the checkpoint file is damaged: {exc}") from exc
