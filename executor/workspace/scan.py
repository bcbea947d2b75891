"""Snapshots of /workspace before and after each execution, and the changes between two."""

import errno
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from executor.workspace.beneath import DIRECTORY_FLAGS
from executor.workspace.inputs import STAGING_PREFIX
from petri.paths import MAX_PATH_BYTES

# Bounds of the scan of /workspace before and after each execution: a hostile tree (deep, a
# million files, slow) costs at most this, and what lies beyond is reported, never fatal.
MAX_SCAN_DEPTH = 64  # components of a path: files deeper are not seen
MAX_SCANNED_ENTRIES = 100_000
SCAN_SECONDS = 2.0  # per scan; the daemon does nothing else meanwhile
# Scan problems listed per execution; the rest are counted in one more entry.
MAX_SCAN_PROBLEMS = 100

# (inode, size, mtime_ns, ctime_ns): any write or replacement changes one of them.
FileState = tuple[int, int, int, int]


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
        root_fd = os.open(root, DIRECTORY_FLAGS)
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
                    fd = os.open(name, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=level.fd)
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
