"""Which uid user code runs as in each sandbox: one that no other live sandbox of the service
user has, whichever of the user's controllers created it.

All runc sandboxes share one user namespace mapping (ContainerSpec.userns_size), so that they
share one ID-mapped copy of each image instead of one copy per sandbox. The kernel counts
processes per uid: with a uid of its own, a sandbox's user code meets only its own
RLIMIT_NPROC (a fork bomb starves no neighbour), and can signal or trace no other sandbox's
processes even past its PID namespace.

Every controller of one service user (the service, a test controller beside it, several on one
host) maps the same subordinate ids, so a uid is reserved for the whole host: a symlink per uid
in a directory they all share, made with symlink(2), which fails when the name exists. Its
target names the holder (registry, boot, pid, process start time) and is never followed. A
reservation stands while its holder process lives or while a container that podman has carries
the uid (labels.LABEL_WORKER_UID): what a crashed controller held is reclaimed by the next
reconcile (at every controller's start, and when the range looks full), which also reserves
what containers carry without a reservation.
"""

import contextlib
import fcntl
import os
import pwd
from pathlib import Path

import structlog

from controller.config import WORKER_UID_FIRST
from controller.errors import ResourceExhausted

log = structlog.get_logger()

# Below it: the image's system accounts, and room for them.
FIRST = WORKER_UID_FIRST

# What a reservation says when no live process holds it, only a container.
HELD_BY_A_CONTAINER = "container"


def shared_directory() -> Path:
    """The one directory every controller of this OS user shares, whatever its environment
    (its home from the password database, not $HOME)."""
    home = pwd.getpwuid(os.geteuid()).pw_dir
    return Path(home) / ".local" / "state" / "petri" / "worker-uids"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid, it names one process);
    None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2, in parentheses) may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


class WorkerUids:
    def __init__(self, userns_size: int, directory: Path, owner: str) -> None:
        if userns_size <= FIRST:
            raise ValueError(f"userns_size must exceed {FIRST}: user code's uids start there")
        self._end = userns_size
        self._directory = directory
        self._boot = _boot_id()
        pid = os.getpid()
        # What each reservation of this process says; ':' cannot occur in a registry label.
        self._holder = f"{owner}:{self._boot}:{pid}:{_start_time(pid)}"
        self._used: set[int] = set()
        # Handed out round the range rather than lowest first: a uid comes back to a new
        # sandbox as late as possible.
        self._next = FIRST

    def __repr__(self) -> str:
        return f"<WorkerUids used={len(self._used)} of {self._end - FIRST} in {self._directory}>"

    def open(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def take(self) -> int:
        """Reserves a uid no sandbox of this host's controllers has; ResourceExhausted when
        every uid is reserved (reconcile, then try again)."""
        for _ in range(self._end - FIRST):
            uid = self._next
            self._next = FIRST if uid + 1 >= self._end else uid + 1
            if uid not in self._used and self._reserve(uid):
                self._used.add(uid)
                return uid
        raise ResourceExhausted(
            f"all {self._end - FIRST} sandbox uids are in use on this host: delete sandboxes, "
            "or raise userns_size (and the service user's subordinate ids)"
        )

    def _reserve(self, uid: int) -> bool:
        try:
            os.symlink(self._holder, self._directory / str(uid))
        except FileExistsError:
            return False  # another controller's
        return True

    def mark(self, uid: int) -> None:
        """Records a uid in use by a sandbox found at start, and makes its reservation this
        process's (it named the previous controller, or went with a reboot)."""
        if not FIRST <= uid < self._end:
            return
        self._used.add(uid)
        # Replaced in one step: removing it first would let another controller take it.
        temporary = self._directory / f".tmp-{uid}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.symlink(self._holder, temporary)
        os.replace(temporary, self._directory / str(uid))

    def release(self, uid: int) -> None:
        if uid not in self._used:
            return
        self._used.discard(uid)
        path = self._directory / str(uid)
        with contextlib.suppress(OSError):
            if os.readlink(path) == self._holder:  # never another controller's
                os.unlink(path)

    def stale(self) -> dict[str, str]:
        """The reservations whose maker is gone, by file name, with what each says. The
        caller lists the containers after this (a process that is gone creates none), and
        passes both to reconcile."""
        found = {}
        for entry in os.scandir(self._directory):
            if not (entry.name.isdigit() or entry.name.startswith(".tmp-")):
                continue
            try:
                holder = os.readlink(entry.path)
            except OSError:
                continue  # gone meanwhile, or not one of ours
            if not self._lives(holder):
                found[entry.name] = holder
        return found

    def reconcile(self, stale: dict[str, str], in_containers: set[int]) -> int:
        """Removes the stale reservations whose uid no container carries (in_containers: the
        worker uids of every registry's containers, listed after `stale`), and reserves the
        uids that containers carry with no reservation (a controller of an older petri made
        them, or the directory was emptied) for as long as a container does. Returns how many
        it removed."""
        for uid in in_containers:
            if FIRST <= uid < self._end:
                with contextlib.suppress(FileExistsError):
                    os.symlink(HELD_BY_A_CONTAINER, self._directory / str(uid))
        dropped = 0
        # One at a time on the host, each reservation checked again under the lock: another
        # reconcile may have dropped it and a live controller made a new one since.
        with open(self._directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, holder in stale.items():
                if name.isdigit() and int(name) in in_containers:
                    continue
                path = self._directory / name
                with contextlib.suppress(OSError):
                    if os.readlink(path) == holder:
                        os.unlink(path)
                        dropped += 1
        if dropped:
            log.info("reclaimed worker uids that no controller holds", count=dropped)
        return dropped

    def _lives(self, holder: str) -> bool:
        parts = holder.split(":")
        if len(parts) != 4 or parts[1] != self._boot or not parts[2].isdigit():
            return False  # made before the last reboot, or not ours
        return _start_time(int(parts[2])) == parts[3]
