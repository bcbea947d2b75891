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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from petri.paths import MAX_PATH_BYTES, InvalidPath, RequestPaths, check_relative_path
from petri.v1 import execution_pb2

STAGING_PREFIX = ".petri-incoming-"
READ_CHUNK_BYTES = 1 << 20
# Bounds of the scan of /workspace before and after each execution: a hostile tree (deep, a
# million files, slow) costs at most this, and what lies beyond is reported, never fatal.
MAX_SCAN_DEPTH = 64  # components of a path: files deeper are not seen
MAX_SCANNED_ENTRIES = 100_000
SCAN_SECONDS = 2.0  # per scan; the daemon does nothing else meanwhile
# Scan problems listed per execution; the rest are counted in one more entry.
MAX_SCAN_PROBLEMS = 100

# (inode, size, mtime_ns, ctime_ns): any write or replacement changes one of them.
FileState = tuple[int, int, int, int]


class InputTooLarge(Exception):
    """The input files exceed the request's limit."""


class WorkspaceFull(Exception):
    """The sandbox's /workspace has no room left."""


class NotAFile(OSError):
    """A path that was a regular file when scanned is something else when read."""


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


@dataclass(frozen=True)
class Unscanned:
    """A part of /workspace the scan could not look at, for omitted_files."""

    path: str  # as shown to the caller: valid UTF-8, at most MAX_PATH_BYTES bytes
    reason: str
    unlisted: int = 0  # > 0: not a path but the count of problems not listed


@dataclass
class Snapshot:
    """The regular files under /workspace by relative path (as the OS names them: a name that
    is not valid UTF-8 keeps its undecodable bytes as surrogates), and what was not scanned."""

    files: dict[str, FileState] = field(default_factory=dict)
    unscanned: list[Unscanned] = field(default_factory=list)
    # Problems beyond MAX_SCAN_PROBLEMS: counted, not listed.
    unlisted: int = 0
    # When the scan stopped early (entries, time): the first path it did not check, and why.
    # Every path from it on, in scan order (component by component, by name), is unknown.
    stopped_at: tuple[str, ...] | None = None
    stop_reason: Unscanned | None = None

    def stop(self, parts: tuple[str, ...], shown: tuple[str, ...], reason: str) -> None:
        self.stopped_at = parts
        self.stop_reason = Unscanned(display_path("/".join(shown)), reason)

    def problem(self, parts: tuple[str, ...], reason: str) -> None:
        if len(self.unscanned) < MAX_SCAN_PROBLEMS:
            self.unscanned.append(Unscanned(display_path("/".join(parts)), reason))
        else:
            self.unlisted += 1


@dataclass
class _Level:
    """A directory being scanned: its descriptor and the names still to look at."""

    fd: int
    parts: tuple[str, ...]
    names: list[str]  # in reverse order: pop() gives the next by name


def snapshot(
    root: Path,
    max_depth: int = MAX_SCAN_DEPTH,
    max_entries: int = MAX_SCANNED_ENTRIES,
    seconds: float = SCAN_SECONDS,
) -> Snapshot:
    """The regular files under root, symlinks never followed, staging directories skipped.

    Never raises for what is in the tree: a directory deeper than `max_depth` components, one
    that cannot be opened or listed, and the point where `max_entries` or `seconds` ran out
    are recorded instead. Iterative and relative to directory descriptors, so neither Python's
    recursion limit nor PATH_MAX bounds the tree it can walk.
    """
    snap = Snapshot()
    deadline = time.monotonic() + seconds
    entries = 0
    try:
        root_fd = os.open(root, _DIRECTORY_FLAGS)
    except OSError as exc:
        snap.problem((), f"/workspace could not be opened ({exc.strerror}): not scanned")
        return snap
    stack: list[_Level] = []
    try:
        names = _list_directory(root_fd, (), snap, max_entries, max_entries)
        stack.append(_Level(root_fd, (), names or []))
        entries += len(names or [])
        while stack and snap.stopped_at is None:
            level = stack[-1]
            if not level.names:
                os.close(stack.pop().fd)
                continue
            name = level.names.pop()
            parts = (*level.parts, name)
            if time.monotonic() >= deadline:
                snap.stop(
                    parts,
                    parts,
                    f"the scan of /workspace took more than {seconds:g} s and stopped here: "
                    "changes to this path and those after it (by name) are not returned",
                )
                break
            if not level.parts and name.startswith(STAGING_PREFIX):
                continue
            try:
                info = os.stat(name, dir_fd=level.fd, follow_symlinks=False)
            except OSError:
                continue  # vanished while we looked
            if stat.S_ISREG(info.st_mode):
                snap.files["/".join(parts)] = (
                    info.st_ino,
                    info.st_size,
                    info.st_mtime_ns,
                    info.st_ctime_ns,
                )
            elif stat.S_ISDIR(info.st_mode):
                if len(parts) >= max_depth:
                    snap.problem(parts, f"deeper than {max_depth} levels: not scanned")
                    continue
                try:
                    fd = os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=level.fd)
                except OSError as exc:
                    if exc.errno not in _VANISHED:
                        snap.problem(parts, f"could not be opened ({exc.strerror}): not scanned")
                    continue
                names = _list_directory(fd, parts, snap, max_entries - entries, max_entries)
                if names is None:
                    os.close(fd)
                    continue
                entries += len(names)
                stack.append(_Level(fd, parts, names))
    finally:
        for level in stack:
            os.close(level.fd)
    return snap


# A directory entry that is gone, or was swapped for a symlink or a file, between two looks.
_VANISHED = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)


def _list_directory(
    fd: int, parts: tuple[str, ...], snap: Snapshot, room: int, limit: int
) -> list[str] | None:
    """The directory's names, last by name first; None if it cannot be listed (a problem
    recorded) or has more than `room` entries, the rest of the scan's `limit` (the scan stops
    at it)."""
    names: list[str] = []
    try:
        with os.scandir(fd) as listing:
            for entry in listing:
                if len(names) >= room:
                    # Names come in no particular order: nothing in this directory is known.
                    snap.stop(
                        (*parts, ""),
                        parts,
                        f"the scan of /workspace stopped after {limit} entries, in "
                        f"{'this directory' if parts else '/workspace itself'}: changes in it "
                        "and after it (by name) are not returned",
                    )
                    return None
                names.append(entry.name)
    except OSError as exc:
        snap.problem(parts, f"could not be listed ({exc.strerror}): not scanned")
        return None
    names.sort(reverse=True)
    return names


def display_path(path: str) -> str:
    """A path as the caller may be shown it: undecodable bytes as \\xNN escapes, and at most
    MAX_PATH_BYTES bytes (cut with "...")."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    data = text.encode()
    if len(data) <= MAX_PATH_BYTES:
        return text
    return data[: MAX_PATH_BYTES - 3].decode(errors="ignore") + "..."


@dataclass(frozen=True)
class ChangedFile:
    path: str  # as display_path shows it
    size: int
    # Why it cannot be returned (its name), or "" when it can.
    problem: str = ""


def changed_files(before: Snapshot, after: Snapshot) -> list[ChangedFile]:
    """Files created or changed between two snapshots, by path; none from where either scan
    stopped on (their change is unknown, see scan_problems)."""
    stop = _first_stop(before, after)
    changes = []
    for path, state in sorted(after.files.items()):
        if before.files.get(path) == state:
            continue
        if stop is not None and tuple(path.split("/")) >= stop[0]:
            continue
        changes.append(ChangedFile(display_path(path), state[1], _path_problem(path)))
    return changes


def scan_problems(before: Snapshot, after: Snapshot) -> list[Unscanned]:
    """What the scans could not look at, once each: the later scan's problems and the first
    stop of either."""
    problems = list(after.unscanned)
    if after.unlisted:
        problems.append(
            Unscanned("", f"{after.unlisted} more paths could not be scanned", after.unlisted)
        )
    stop = _first_stop(before, after)
    if stop is not None:
        problems.append(stop[1])
    return problems


def _first_stop(before: Snapshot, after: Snapshot) -> tuple[tuple[str, ...], Unscanned] | None:
    """Where the earlier-stopping of the two scans stopped, and why."""
    stops = [
        (s.stopped_at, s.stop_reason)
        for s in (before, after)
        if s.stopped_at is not None and s.stop_reason is not None
    ]
    return min(stops, key=lambda stop: stop[0]) if stops else None


def _path_problem(path: str) -> str:
    try:
        data = path.encode()
    except UnicodeEncodeError:
        return "its name is not valid UTF-8: not returned (rename it to return it)"
    if len(data) > MAX_PATH_BYTES:
        return f"its path is longer than {MAX_PATH_BYTES} bytes: not returned"
    return ""


def read_chunks(root: Path, path: str, size: int) -> Iterator[bytes]:
    """The file's bytes, at most `size` of them, never through a symlink. OSError (NotAFile
    included) or InvalidPath when it is not a regular file at that path any more."""
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
