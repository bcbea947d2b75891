"""The files API outside executions: list, read, write and delete beneath /workspace.

Every operation runs on one thread of its own whose effective uid and gid are user code's
(UserThread): it can read, write and remove exactly what user code could, and the files it
creates are user code's. It walks one directory at a time from /workspace's descriptor and
never follows a symlink (beneath.open_directory_beneath): user code owns the tree and may
rearrange it while we look, so nothing is trusted between two system calls.

    list_page     one page of a directory's entries (or a whole tree's), sorted by path bytes
    FileReader    a regular file's bytes, with a check that it did not change while read
    FileWriter    chunks staged beside the target, renamed into place on the final one
    delete        a file, a symlink or a whole tree, without holding a descriptor per level
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import ctypes
import errno
import functools
import os
import platform
import secrets
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from executor.workspace.beneath import DIRECTORY_FLAGS, READ_CHUNK_BYTES, open_directory_beneath
from executor.workspace.inputs import STAGING_PREFIX, WorkspaceFull
from executor.workspace.scan import display_path
from petri.paths import InvalidPath, check_relative_path
from petri.v1 import files_pb2

# A recursive listing goes this many components deep (as the execution scans): a directory
# at that depth is listed, its entries are not. Deeper trees cost nothing and hold no fds.
MAX_LIST_DEPTH = 64
# One page of a listing may take this long (it walks the whole tree, keeping only one page).
LIST_SECONDS = 10.0
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
# A page ends sooner when its entries pass this many bytes: user code names them, and 10,000
# paths 64 levels deep would make a message of 160 MiB for the controller to hold.
MAX_PAGE_BYTES = 4 << 20
# A delete may take this long (a huge tree, or user code filling it as it goes): the file
# thread is every files call's, so none may hold it for ever.
DELETE_SECONDS = 60.0
# A page token is the last path returned (base64): at most a path's bytes at that depth.
MAX_PAGE_TOKEN_CHARS = 4 * (MAX_LIST_DEPTH * 256 + 2) // 3 + 4

T = TypeVar("T")
_clock = time.monotonic  # (tests move it)


class FileNotFound(Exception):
    """The path does not exist."""


class WrongType(Exception):
    """The path exists but is not what the call needs (a directory, a regular file)."""


class Changed(Exception):
    """The file or tree changed while it was read or removed: nothing coherent to return."""


class TooSlow(Exception):
    """A listing took longer than LIST_SECONDS."""


# --- the thread that acts as user code --------------------------------------------------------

# Raw system call numbers (by machine): glibc's wrappers would change every thread's ids.
_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setresuid": 117, "setresgid": 119},
    "aarch64": {"setgroups": 159, "setresuid": 147, "setresgid": 149},
}


def _become(user: int) -> None:
    """Makes the calling thread, and it alone, act as `user` (effective uid and gid, no
    supplementary group). Real and saved ids stay root's, so user code cannot signal or trace
    the daemon through this thread (the kernel checks those)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"no per-thread identity change on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    keep = ctypes.c_long(-1)
    for name, args in (
        ("setgroups", (ctypes.c_long(0), ctypes.c_void_p(None))),
        ("setresgid", (keep, ctypes.c_long(user), keep)),
        ("setresuid", (keep, ctypes.c_long(user), keep)),
    ):
        if libc.syscall(ctypes.c_long(numbers[name]), *args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{name}: {os.strerror(code)}")
    if os.geteuid() != user or os.getegid() != user or os.getgroups():
        raise OSError(errno.EPERM, "the file thread did not take user code's identity")


class UserThread:
    """One thread for every file operation, as user code's uid when `user` is given (the
    daemon runs as root then); as the daemon itself otherwise (tests, a non-root daemon)."""

    def __init__(self, user: int | None) -> None:
        initializer: Callable[..., object] = _become if user is not None else (lambda: None)
        self._pool = ThreadPoolExecutor(
            1,
            thread_name_prefix="petri-files",
            initializer=initializer,
            initargs=(user,) if user is not None else (),
        )

    async def run(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(function, *args))

    async def open(
        self, function: Callable[..., T], close: Callable[[T], object], *args: object
    ) -> T:
        """run(function, *args) for what holds descriptors (a FileReader, a FileWriter): if
        the caller is cancelled while it runs, `close` gets what it returns, on this thread
        (else nothing would, and each cancelled call would leave its descriptors open)."""
        future = self._pool.submit(functools.partial(function, *args))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(self._close_unclaimed, close))
            raise

    def _close_unclaimed(self, close: Callable[[T], object], future: Future[T]) -> None:
        if not future.cancelled() and future.exception() is None:
            with contextlib.suppress(RuntimeError):  # shut down: the daemon is ending
                self.later(functools.partial(close, future.result()))

    def later(self, function: Callable[[], object]) -> None:
        """Runs `function` after whatever the thread is doing (a cleanup that must not race
        an operation still under way on the same descriptors, and must not wait)."""
        self._pool.submit(function)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- walking ---------------------------------------------------------------------------------


def _open_root(root: Path) -> int:
    return os.open(root, DIRECTORY_FLAGS)


def _parent_of(root: Path, parts: tuple[str, ...]) -> int:
    """The descriptor of the directory holding parts[-1]: FileNotFound if a directory on the
    way is missing, InvalidPath if one is a symlink or a file."""
    root_fd = _open_root(root)
    try:
        return open_directory_beneath(root_fd, parts[:-1])
    except FileNotFoundError:
        raise FileNotFound("/".join(parts)) from None
    finally:
        os.close(root_fd)


def _lstat(parent: int, name: str, path: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise FileNotFound(path) from None


def _kind(mode: int) -> files_pb2.FileInfo.Type.ValueType:
    if stat.S_ISREG(mode):
        return files_pb2.FileInfo.REGULAR
    if stat.S_ISDIR(mode):
        return files_pb2.FileInfo.DIRECTORY
    if stat.S_ISLNK(mode):
        return files_pb2.FileInfo.SYMLINK
    return files_pb2.FileInfo.OTHER


def file_info(path: str, info: os.stat_result) -> files_pb2.FileInfo:
    """`path` as the OS names it (undecodable bytes as surrogates): shown escaped."""
    message = files_pb2.FileInfo(
        path=display_path(path),
        type=_kind(info.st_mode),
        size=info.st_size,
        mode=stat.S_IMODE(info.st_mode),
    )
    message.modify_time.FromNanoseconds(info.st_mtime_ns)
    return message


# --- ListFiles -------------------------------------------------------------------------------


def decode_page_token(token: str) -> bytes | None:
    """The last path of the previous page (raw bytes); InvalidPath for a token not ours."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidPath("page_token is not one this listing returned")
    try:
        return base64.urlsafe_b64decode(token.encode("ascii"))
    except (ValueError, binascii.Error):
        raise InvalidPath("page_token is not one this listing returned") from None


def _encode_page_token(path: bytes) -> str:
    return base64.urlsafe_b64encode(path).decode()


# A kept entry: its path relative to root (bytes, the sort key) and its lstat.
_Entry = tuple[bytes, os.stat_result]


@dataclass
class _Frame:
    """A directory of a recursive listing whose subdirectories are still to walk."""

    fd: int
    base: bytes  # its path relative to root, with a trailing "/" (b"" for root)
    depth: int  # its components
    subdirectories: list[bytes]


def list_page(
    root: Path,
    path: str,
    recursive: bool,
    page_size: int,
    after: bytes | None,
    seconds: float = LIST_SECONDS,
) -> files_pb2.ListFilesResponse:
    """The first `page_size` entries beneath `path` (relative to root; "" for root itself)
    whose paths sort after `after`, by bytes, and the token of the next page.

    The whole tree is walked for each page, depth first with one descriptor per level (at
    most MAX_LIST_DEPTH), skipping subtrees wholly before `after` or beyond the page, and
    keeping only page_size + 1 entries: memory stays flat however big the directory.
    TooSlow past `seconds`. FileNotFound, WrongType (not a directory) or InvalidPath (a
    symlink or a file on the way) for `path` itself."""
    parts = check_relative_path(path) if path else ()
    root_fd = _open_root(root)
    try:
        top = _open_listed_directory(root_fd, parts, path)
    finally:
        os.close(root_fd)
    page = _Page(page_size + 1, after, _clock() + seconds, seconds)
    base = os.fsencode(path) + b"/" if path else b""
    stack = [_Frame(top, base, len(parts), [])]
    try:
        stack[0].subdirectories = page.offer_entries(top, base)
        while stack and recursive:
            frame = stack[-1]
            if not frame.subdirectories or frame.depth + 1 >= MAX_LIST_DEPTH:
                os.close(stack.pop().fd)
                continue
            name = frame.subdirectories.pop()
            child = frame.base + name + b"/"
            if page.skips_subtree(child):
                continue
            try:
                fd = os.open(name, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=frame.fd)
            except OSError:
                continue  # gone, or swapped for a symlink or a file, since listed
            stack.append(_Frame(fd, child, frame.depth + 1, []))
            stack[-1].subdirectories = page.offer_entries(fd, child)
    finally:
        for frame in stack:
            os.close(frame.fd)
    kept = page.kept
    response = files_pb2.ListFilesResponse()
    size = 0
    for path_bytes, info in kept[:page_size]:
        entry = file_info(os.fsdecode(path_bytes), info)
        size += entry.ByteSize()
        if response.files and size > MAX_PAGE_BYTES:
            break
        response.files.append(entry)
    if len(response.files) < len(kept):
        response.next_page_token = _encode_page_token(kept[len(response.files) - 1][0])
    return response


@dataclass
class _Page:
    """The smallest paths after `after` seen so far, at most `limit` of them, in order."""

    limit: int
    after: bytes | None
    deadline: float
    seconds: float
    kept: list[_Entry] = field(default_factory=list)

    def skips_subtree(self, child: bytes) -> bool:
        """Whether nothing beneath `child` (a directory's path and "/") can join the page:
        every such path lies between `child` and child[:-1] + "0" ("0" follows "/")."""
        if self.after is not None and self.after >= child[:-1] + b"0":
            return True
        return len(self.kept) >= self.limit and child > self.kept[-1][0]

    def offer_entries(self, fd: int, base: bytes) -> list[bytes]:
        """Offers each entry of the directory `fd` (at `base`); returns the names of its
        subdirectories, last by name first."""
        subdirectories = []
        self._check_time()  # for each directory, however small
        with os.scandir(fd) as entries:
            for count, entry in enumerate(entries):
                if count % 256 == 255:
                    self._check_time()
                name = os.fsencode(entry.name)
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        subdirectories.append(name)
                self._offer(fd, entry.name, base + name)
        subdirectories.sort(reverse=True)
        return subdirectories

    def _check_time(self) -> None:
        if _clock() > self.deadline:
            raise TooSlow(
                f"listing took more than {self.seconds:g} s (a very large tree): list a "
                "subdirectory, or without recursive"
            )

    def _offer(self, fd: int, name: str, full: bytes) -> None:
        if self.after is not None and full <= self.after:
            return
        if len(self.kept) >= self.limit and full >= self.kept[-1][0]:
            return
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return  # vanished while we looked
        bisect.insort(self.kept, (full, info), key=lambda entry: entry[0])
        if len(self.kept) > self.limit:
            self.kept.pop()


def _open_listed_directory(root_fd: int, parts: tuple[str, ...], path: str) -> int:
    if not parts:
        return os.dup(root_fd)
    try:
        parent = open_directory_beneath(root_fd, parts[:-1])
    except FileNotFoundError:
        raise FileNotFound(path) from None
    try:
        return os.open(parts[-1], DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        raise FileNotFound(path) from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            kind = "a symlink" if exc.errno == errno.ELOOP else "not a directory"
            raise WrongType(f"{path!r} is {kind}: only a directory can be listed") from None
        raise
    finally:
        os.close(parent)


# --- ReadFile --------------------------------------------------------------------------------


class FileReader:
    """A regular file opened once, beneath root and never through a symlink; its chunks,
    then a check that it is the size it had when opened and did not change meanwhile."""

    def __init__(self, root: Path, path: str) -> None:
        parts = check_relative_path(path)
        parent = _parent_of(root, parts)
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            self._fd = os.open(parts[-1], flags, dir_fd=parent)
        except FileNotFoundError:
            raise FileNotFound(path) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise WrongType(f"{path!r} is a symlink: it is not followed") from None
            raise
        finally:
            os.close(parent)
        try:
            self.opened = os.fstat(self._fd)
            if not stat.S_ISREG(self.opened.st_mode):
                kind = "a directory" if stat.S_ISDIR(self.opened.st_mode) else "not a regular file"
                raise WrongType(f"{path!r} is {kind}: only a regular file can be read")
        except BaseException:
            os.close(self._fd)
            raise
        self.path = path
        self.size = self.opened.st_size
        self._sent = 0

    @property
    def done(self) -> bool:
        return self._sent >= self.size

    def next_chunk(self) -> bytes:
        """The next bytes (b"" once `size` were read); Changed if the file shrank."""
        remaining = self.size - self._sent
        if remaining <= 0:
            return b""
        data = os.read(self._fd, min(READ_CHUNK_BYTES, remaining))
        if not data:
            raise Changed(
                f"{self.path!r} shrank while it was read ({self._sent} of {self.size} bytes): "
                "read it again"
            )
        self._sent += len(data)
        return data

    def check_unchanged(self) -> None:
        """Changed unless the file still has the size, mtime and ctime it was opened with
        (any write changes them) and nothing follows its last byte."""
        now = os.fstat(self._fd)
        before = (self.opened.st_size, self.opened.st_mtime_ns, self.opened.st_ctime_ns)
        if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != before or os.read(self._fd, 1):
            raise Changed(f"{self.path!r} changed while it was read: read it again")

    def close(self) -> None:
        os.close(self._fd)


# --- WriteFile -------------------------------------------------------------------------------


class FileWriter:
    """One file's chunks, staged beside its target (in its deepest directory that exists)
    and renamed into place by `commit`; `discard` leaves /workspace as it was."""

    def __init__(self, root: Path, path: str) -> None:
        self.parts = check_relative_path(path)
        self.path = path
        root_fd = _open_root(root)
        try:
            # The existing directories on the way; the missing ones are made by commit only.
            self._dir_fd = os.dup(root_fd)
            self._missing = list(self.parts[:-1])
            while self._missing:
                try:
                    next_fd = open_directory_beneath(self._dir_fd, (self._missing[0],))
                except FileNotFoundError:
                    break
                except BaseException:
                    os.close(self._dir_fd)
                    raise
                os.close(self._dir_fd)
                self._dir_fd = next_fd
                self._missing.pop(0)
        finally:
            os.close(root_fd)
        if not self._missing:
            self._check_target(self._dir_fd)
        self._staged = STAGING_PREFIX + secrets.token_hex(8)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd: int | None = os.open(self._staged, flags, 0o644, dir_fd=self._dir_fd)
        except OSError as exc:
            os.close(self._dir_fd)
            raise _write_error(exc) from exc
        self.size = 0

    def _check_target(self, parent: int) -> None:
        try:
            info = os.stat(self.parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise WrongType(f"{self.path!r} is a directory: delete it first to write a file")
        if stat.S_ISLNK(info.st_mode):
            raise InvalidPath(f"file path {self.path!r} goes through a symlink")

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _write_error(exc) from exc
        self.size += len(data)

    def commit(self) -> os.stat_result:
        """Puts the file in place (making its missing directories); its stat."""
        assert self._fd is not None
        info = os.fstat(self._fd)
        os.close(self._fd)
        self._fd = None
        try:
            parent = open_directory_beneath(self._dir_fd, tuple(self._missing), create=True)
        except OSError as exc:
            raise _write_error(exc) from exc
        try:
            self._check_target(parent)
            os.rename(self._staged, self.parts[-1], src_dir_fd=self._dir_fd, dst_dir_fd=parent)
        except IsADirectoryError:
            raise WrongType(
                f"{self.path!r} is a directory: delete it first to write a file"
            ) from None
        except OSError as exc:
            raise _write_error(exc) from exc
        finally:
            os.close(parent)
        self._staged = ""
        self.discard()
        return info

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd < 0:
            return
        if self._staged:
            with contextlib.suppress(OSError):
                os.unlink(self._staged, dir_fd=self._dir_fd)
        os.close(self._dir_fd)
        self._dir_fd = -1


def _write_error(exc: OSError) -> Exception:
    if exc.errno == errno.ENOSPC:
        return WorkspaceFull("the sandbox's /workspace is full: delete files or send less")
    if exc.errno == errno.EDQUOT:
        return WorkspaceFull("the sandbox's /workspace is over its quota: delete files")
    return exc


# --- DeleteFile ------------------------------------------------------------------------------


def delete(
    root: Path, path: str, recursive: bool, allow_missing: bool, seconds: float = DELETE_SECONDS
) -> None:
    """Removes a file, a symlink (not what it points to) or, with `recursive`, a directory and
    everything in it. FileNotFound unless `allow_missing`; WrongType for a directory without
    `recursive`; Changed when the tree is moved while it is removed; TooSlow past `seconds`
    (what was removed stays removed)."""
    parts = check_relative_path(path)
    try:
        parent = _parent_of(root, parts)
    except FileNotFound:
        if allow_missing:
            return
        raise
    try:
        try:
            info = _lstat(parent, parts[-1], path)
        except FileNotFound:
            if allow_missing:
                return
            raise
        if not stat.S_ISDIR(info.st_mode):
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: the goal
                os.unlink(parts[-1], dir_fd=parent)
            return
        if not recursive:
            raise WrongType(f"{path!r} is a directory: set recursive to delete it")
        _remove_tree(parent, parts[-1], path, _clock() + seconds)
    finally:
        os.close(parent)


def _remove_tree(parent: int, name: str, path: str, deadline: float) -> None:
    """Removes the directory `name` in `parent` depth first, holding one descriptor at a time
    (a tree thousands of levels deep needs no more): it climbs back through "..", checked to
    be the directory it came down from, so a tree moved meanwhile is never left."""
    fd = os.open(name, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    # (name, identity of the directory that holds it) for each level below `name`.
    trail: list[tuple[str, tuple[int, int]]] = []
    try:
        while True:
            subdirectory = _empty_but_directories(fd, path, deadline)
            if subdirectory is not None:
                here = os.fstat(fd)
                try:
                    child = os.open(subdirectory, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        continue  # changed since listed: look again
                    raise
                trail.append((subdirectory, (here.st_dev, here.st_ino)))
                os.close(fd)
                fd = child
                continue
            if not trail:
                break
            child_name, expected = trail.pop()
            up = os.open("..", DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = up
            there = os.fstat(fd)
            if (there.st_dev, there.st_ino) != expected:
                raise Changed(f"{path!r} was moved while it was deleted: part of it remains")
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(child_name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent)


def _empty_but_directories(fd: int, path: str, deadline: float) -> str | None:
    """Removes every entry of the directory but directories; the name of one of those, or
    None when it is empty. TooSlow past `deadline`, checked every 256 entries too: user code
    adding files as fast as they go would keep one pass over the directory going for ever."""
    with os.scandir(fd) as entries:
        for count, entry in enumerate(entries):
            if count % 256 == 0 and _clock() > deadline:
                raise TooSlow(f"deleting {path!r} took too long: part of it remains")
            try:
                is_directory = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_directory:
                return entry.name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=fd)
    return None
