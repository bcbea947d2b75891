"""Which uid user code runs as in each sandbox: one that no other live sandbox has.

All runc sandboxes share one user namespace mapping (ContainerSpec.userns_size), so that they
share one ID-mapped copy of each image instead of one copy per sandbox. The kernel counts
processes per uid: with a uid of its own, a sandbox's user code meets only its own
RLIMIT_NPROC (a fork bomb starves no neighbour), and can signal or trace no other sandbox's
processes even past its PID namespace.
"""

from controller.errors import ResourceExhausted

# Below it: the image's system accounts, and room for them.
FIRST = 10000


class WorkerUids:
    def __init__(self, userns_size: int) -> None:
        if userns_size <= FIRST:
            raise ValueError(f"userns_size must exceed {FIRST}: user code's uids start there")
        self._end = userns_size
        self._used: set[int] = set()
        # Handed out round the range rather than lowest first: a uid comes back to a new
        # sandbox as late as possible.
        self._next = FIRST

    def __repr__(self) -> str:
        return f"<WorkerUids used={len(self._used)} of {self._end - FIRST}>"

    def take(self) -> int:
        if len(self._used) >= self._end - FIRST:
            raise ResourceExhausted(
                f"all {self._end - FIRST} sandbox uids are in use: delete sandboxes, or raise "
                "userns_size (and the service user's subordinate ids)"
            )
        while self._next in self._used:
            self._next = FIRST if self._next + 1 >= self._end else self._next + 1
        uid = self._next
        self._used.add(uid)
        self._next = FIRST if uid + 1 >= self._end else uid + 1
        return uid

    def mark(self, uid: int) -> None:
        """Records a uid in use by a sandbox found at start."""
        if FIRST <= uid < self._end:
            self._used.add(uid)

    def release(self, uid: int) -> None:
        self._used.discard(uid)
