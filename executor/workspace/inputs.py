"""Input files: received into a private staging directory on the same filesystem, moved
into place (rename) only once all of them arrived and every target was checked."""

import contextlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from executor.workspace.beneath import DIRECTORY_FLAGS, open_directory_beneath
from petri.paths import InvalidPath, RequestPaths, check_relative_path
from petri.v1 import execution_pb2

STAGING_PREFIX = ".petri-incoming-"


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
    _paths: RequestPaths = field(default_factory=RequestPaths)
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
            parts = check_relative_path(chunk.path)
            self._paths.add(chunk.path, parts)  # none twice, none inside another
            current = _StagedFile(parts, str(len(self._files)))
            self._files.append(current)
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
        root_fd = os.open(self.root, DIRECTORY_FLAGS)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=root_fd)
                fd = os.open(name, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
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
        root_fd = os.open(self.root, DIRECTORY_FLAGS)
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
            root_fd = os.open(self.root, DIRECTORY_FLAGS)
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


def _check_target(root: Path, parts: tuple[str, ...]) -> None:
    path = "/".join(parts)
    current = root
    for index, part in enumerate(parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return  # the rest will be created
        except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES...: refused, nothing written
            raise InvalidPath(
                f"file path {path[:64]!r}... cannot be checked: {exc.strerror}"
            ) from None
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
