"""Opening and reading beneath /workspace one directory at a time, never following a
symlink: user code owns the tree and may rearrange it at any moment."""

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from petri.paths import InvalidPath

READ_CHUNK_BYTES = 1 << 20
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class NotAFile(OSError):
    """A path that was a regular file when scanned is something else when read."""


def open_directory_beneath(
    root_fd: int,
    parts: tuple[str, ...],
    create: bool = False,
    owner: tuple[int, int] | None = None,
) -> int:
    """Opens root/parts[0]/parts[1]/... one directory at a time, never following a symlink;
    with `create`, missing directories are made (and given to `owner`). InvalidPath when a
    component is a symlink or not a directory."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                next_fd = os.open(part, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                next_fd = os.open(part, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidPath(
                        f"{'/'.join(parts)!r} goes through a symlink or a file ({part})"
                    ) from None
                raise
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_chunks(root: Path, path: str, size: int) -> Iterator[bytes]:
    """The file's bytes, at most `size` of them, never through a symlink. OSError (NotAFile
    included) or InvalidPath when it is not a regular file at that path any more."""
    parts = tuple(path.split("/"))
    root_fd = os.open(root, DIRECTORY_FLAGS)
    try:
        parent = open_directory_beneath(root_fd, parts[:-1])
    finally:
        os.close(root_fd)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFile("it is no longer a regular file")  # replaced since the scan
        handle = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with contextlib.closing(handle):
        remaining = size
        while remaining > 0:
            data = handle.read(min(READ_CHUNK_BYTES, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data
