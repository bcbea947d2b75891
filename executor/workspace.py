"""Files in /workspace: inputs staged then put in place, changes detected, outputs read back.

Inputs are received into a private staging directory on the same filesystem and only moved
into place (rename) once all of them arrived and every target was checked, so a refused
request writes nothing. Nothing here follows a symlink: a target whose path crosses one is
refused, and symlinks are never returned as outputs.
"""

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from executor.paths import InvalidPath, check_relative_path
from petri.v1 import execution_pb2

STAGING_PREFIX = ".petri-incoming-"
READ_CHUNK_BYTES = 1 << 20
# A pathological tree (a million files) must not stall every execution.
MAX_SCANNED_ENTRIES = 100_000

# (inode, size, mtime_ns, ctime_ns): any write or replacement changes one of them.
FileState = tuple[int, int, int, int]


class InputTooLarge(Exception):
    """The input files exceed the request's limit."""


class WorkspaceFull(Exception):
    """The sandbox's /workspace has no room left."""


@dataclass
class _StagedFile:
    parts: tuple[str, ...]
    staged_name: str
    final: bool = False


@dataclass
class InputStager:
    """Receives input file chunks into a private directory; `commit` puts them in place.

    The staging directory sits in /workspace, which user code owns and may rearrange at any
    moment (a background process): so it is reached through a descriptor opened once and
    checked to be ours, never by its name, and the files are given away through their own
    descriptors. Nothing user code renames or links can redirect a write or a chown.
    """

    root: Path
    max_bytes: int
    # uid and gid that user code runs as: given to the files and directories put in place.
    owner: tuple[int, int] | None = None
    total_bytes: int = 0
    _files: list[_StagedFile] = field(default_factory=list)
    _paths: set[str] = field(default_factory=set)
    _dir_name: str = ""
    _dir_fd: int | None = None
    _fd: int | None = None

    def add(self, chunk: execution_pb2.FileChunk) -> None:
        current = self._files[-1] if self._files else None
        if current is None or current.final or "/".join(current.parts) != chunk.path:
            if current is not None and not current.final:
                raise InvalidPath(
                    f"file {'/'.join(current.parts)!r} ended without a chunk marked final"
                )
            if chunk.path in self._paths:
                raise InvalidPath(f"file {chunk.path!r} is sent twice")
            current = _StagedFile(check_relative_path(chunk.path), str(len(self._files)))
            self._files.append(current)
            self._paths.add(chunk.path)
            self._open(current)
        self.total_bytes += len(chunk.data)
        if self.total_bytes > self.max_bytes:
            raise InputTooLarge(
                f"input files exceed {self.max_bytes} bytes in total; send fewer or smaller files"
            )
        assert self._fd is not None
        try:
            view = memoryview(chunk.data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _write_error(exc) from exc
        if chunk.final:
            current.final = True
            self._close_file()

    def _open(self, staged: _StagedFile) -> None:
        if self._dir_fd is None:
            self._dir_fd = self._make_staging_directory()
        self._close_file()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(staged.staged_name, flags, 0o644, dir_fd=self._dir_fd)
        except OSError as exc:
            raise _write_error(exc) from exc

    def _make_staging_directory(self) -> int:
        name = STAGING_PREFIX + secrets.token_hex(8)
        root_fd = os.open(self.root, _DIRECTORY_FLAGS)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=root_fd)
                fd = os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
            except OSError as exc:
                raise _write_error(exc) from exc
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
                os.close(fd)  # swapped between mkdir and open: not ours
                raise InvalidPath("the staging directory was replaced while it was made")
        finally:
            os.close(root_fd)
        self._dir_name = name
        return fd

    def _close_file(self) -> None:
        if self._fd is None:
            return
        if self.owner is not None:
            os.fchown(self._fd, *self.owner)  # the file itself: no name to be redirected
        os.close(self._fd)
        self._fd = None

    def finish(self) -> None:
        """Checks that the input ended cleanly (the last file's last chunk was marked final)."""
        if self._files and not self._files[-1].final:
            raise InvalidPath(
                f"file {'/'.join(self._files[-1].parts)!r} ended without a chunk marked final"
            )

    def commit(self) -> None:
        """Moves every staged file to its path; checks all targets before moving any.

        The moves walk directory by directory without following symlinks, so code racing
        them (a background process of the sandbox) cannot redirect a file out of /workspace.
        """
        for staged in self._files:
            _check_target(self.root, staged.parts)
        if not self._files:
            return
        assert self._dir_fd is not None
        root_fd = os.open(self.root, _DIRECTORY_FLAGS)
        try:
            for staged in self._files:
                parent = open_directory_beneath(
                    root_fd, staged.parts[:-1], create=True, owner=self.owner
                )
                try:
                    os.rename(
                        staged.staged_name,
                        staged.parts[-1],
                        src_dir_fd=self._dir_fd,
                        dst_dir_fd=parent,
                    )
                except IsADirectoryError:
                    raise InvalidPath(
                        f"file path {'/'.join(staged.parts)!r} is a directory in the sandbox"
                    ) from None
                finally:
                    os.close(parent)
        finally:
            os.close(root_fd)
        self.discard()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is None:
            return
        for staged in self._files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged.staged_name, dir_fd=self._dir_fd)
        # The (now empty) directory goes by name only if the name is still ours.
        with contextlib.suppress(OSError):
            ours = os.fstat(self._dir_fd)
            root_fd = os.open(self.root, _DIRECTORY_FLAGS)
            try:
                there = os.stat(self._dir_name, dir_fd=root_fd, follow_symlinks=False)
                if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
                    os.rmdir(self._dir_name, dir_fd=root_fd)
            finally:
                os.close(root_fd)
        os.close(self._dir_fd)
        self._dir_fd = None


def _write_error(exc: OSError) -> Exception:
    if exc.errno == 28:  # ENOSPC
        return WorkspaceFull("the sandbox's /workspace is full: delete files or send less")
    return exc


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


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
                next_fd = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                next_fd = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
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


def _check_target(root: Path, parts: tuple[str, ...]) -> None:
    path = "/".join(parts)
    current = root
    for index, part in enumerate(parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return  # the rest will be created
        last = index == len(parts) - 1
        if stat.S_ISLNK(info.st_mode):
            raise InvalidPath(
                f"file path {path!r} goes through a symlink ({'/'.join(parts[: index + 1])})"
            )
        if not last and not stat.S_ISDIR(info.st_mode):
            raise InvalidPath(
                f"file path {path!r}: {'/'.join(parts[: index + 1])} is not a directory"
            )
        if last and stat.S_ISDIR(info.st_mode):
            raise InvalidPath(f"file path {path!r} is a directory in the sandbox")


def snapshot(root: Path) -> dict[str, FileState]:
    """The regular files under root (symlinks not followed, staging directories skipped)."""
    states: dict[str, FileState] = {}
    budget = [MAX_SCANNED_ENTRIES]
    _scan(root, "", states, budget)
    return states


def _scan(directory: Path, prefix: str, states: dict[str, FileState], budget: list[int]) -> None:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in sorted(entries, key=lambda e: e.name):
        budget[0] -= 1
        if budget[0] < 0:
            return
        if entry.name.startswith(STAGING_PREFIX) and not prefix:
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                _scan(Path(entry.path), f"{prefix}{entry.name}/", states, budget)
            elif entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                states[prefix + entry.name] = (
                    info.st_ino,
                    info.st_size,
                    info.st_mtime_ns,
                    info.st_ctime_ns,
                )
        except OSError:
            continue  # vanished while we looked


@dataclass(frozen=True)
class ChangedFile:
    path: str
    size: int


def changed_files(before: dict[str, FileState], after: dict[str, FileState]) -> list[ChangedFile]:
    """Files created or changed between two snapshots, by path."""
    return [
        ChangedFile(path, state[1])
        for path, state in sorted(after.items())
        if before.get(path) != state
    ]


def read_chunks(root: Path, path: str, size: int) -> Iterator[bytes]:
    """The file's bytes, at most `size` of them, never through a symlink."""
    parts = tuple(path.split("/"))
    root_fd = os.open(root, _DIRECTORY_FLAGS)
    try:
        parent = open_directory_beneath(root_fd, parts[:-1])
    finally:
        os.close(root_fd)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, dir_fd=parent)
    finally:
        os.close(parent)
    with contextlib.closing(os.fdopen(fd, "rb", buffering=0)) as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        remaining = size
        while remaining > 0:
            data = handle.read(min(READ_CHUNK_BYTES, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data
