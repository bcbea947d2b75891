"""Per-project quotas, RESOURCE_EXHAUSTED naming the limit; and the server's own limit on
container starts at once, where a start waits its turn instead (CreateSlots)."""

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from controller.errors import QuotaExceeded, ResourceExhausted

WINDOW_SECONDS = 60.0
# How long a warm pool refill waits behind users' starts under way (never behind a user
# waiting) before it takes a free slot anyway: a steady trickle of cold creates must not keep
# the pool empty for good, which would make every create of the trickle a cold one. Longer
# than a first burst's starts, which refills must not slow down (issue 16).
REFILL_PATIENCE = 10.0


class CreateSlots:
    """The server's limit on containers starting at once (creates, resumes, warm pool
    refills). A start beyond it waits its turn, first come first served within its project,
    the projects taking turns (one project's flood of creates does not hold another's lone
    create behind all of it). A slot that ends is handed straight to the next in line, so a
    newcomer never overtakes a waiter, and a waiter that leaves (cancelled, or past its
    timeout) leaves the line without losing anyone's slot.

    Users' starts go before the pool's refills, and a refill starts only while no user's
    start is under way or waiting: on a machine whose cores a burst of cold starts already
    fills, a refill (a full preload, the costliest start there is) would only delay the
    users' (issue 16: refills during a first burst of 20 doubled its p99). But a refill
    that has waited REFILL_PATIENCE takes a free slot while users' starts are under way (one
    such refill at a time, and not while a user waits): else a trickle of cold creates whose
    starts overlap would keep the pool empty for as long as it lasts, each create of it cold.

    Not asyncio.Semaphore: it has no priority for users over refills, and its fairness under
    cancellation has changed between point releases; here the hand-off is explicit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refill_patience = REFILL_PATIENCE
        self._taken = 0
        self._users_taken = 0  # of _taken: the users' starts
        # Invariant: while a user waits, every slot is taken (a release hands its slot on);
        # while a refill waits, every slot is taken, or a user waits, or a user's start is
        # under way and either no refill has waited refill_patience or a refill runs.
        # Each project's line, in the order the projects take turns; then the refills'.
        self._users: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._refills: collections.deque[asyncio.Future[None]] = collections.deque()
        # The refills in line that have waited refill_patience.
        self._overdue: set[asyncio.Future[None]] = set()

    def __repr__(self) -> str:
        return f"<CreateSlots {self._taken}/{self.limit} waiting={self.waiting}>"

    @property
    def taken(self) -> int:
        return self._taken

    @property
    def waiting(self) -> int:
        """Starts waiting for a slot (read by the metrics' thread: only lengths)."""
        return sum(len(line) for line in list(self._users.values())) + len(self._refills)

    async def take(self, timeout: float | None, refill: bool = False, project: str = "") -> float:
        """Waits for a slot, at most `timeout` seconds (None: no limit; TimeoutError past
        it), in `project`'s line; returns the seconds waited. Give it back with release()."""
        if self._taken < self.limit and (not refill or self._users_idle()):
            self._taken += 1
            self._users_taken += not refill
            return 0.0
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        loop = asyncio.get_running_loop()
        started = loop.time()
        granted: asyncio.Future[None] = loop.create_future()
        line = self._refills if refill else self._users.setdefault(project, collections.deque())
        line.append(granted)
        overdue = None
        if refill:
            overdue = loop.call_later(self.refill_patience, self._refill_overdue, granted)
        try:
            async with asyncio.timeout(timeout):
                await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(refill)  # granted as it left: the slot goes to the next in line
            else:
                granted.cancel()
                if granted in line:  # a release may have dropped it already
                    line.remove(granted)
                if not refill and not line and self._users.get(project) is line:
                    del self._users[project]
            raise
        finally:
            if overdue is not None:
                overdue.cancel()
                self._overdue.discard(granted)
        return loop.time() - started

    def release(self, refill: bool = False) -> None:
        """Gives a slot back (`refill`: a refill's): to the first waiter of the project whose
        turn it is (that project's turn then passes to the next); else to the refills that
        may start (see _start_refills)."""
        while self._users:
            project = next(iter(self._users))
            line = self._users.pop(project)
            handed = _hand_over(line)
            if line:
                self._users[project] = line  # its next waiter goes after the other projects'
            if handed:
                self._users_taken += refill  # a refill's slot became a user's
                return
        self._taken -= 1
        self._users_taken -= not refill
        self._start_refills()

    def _refill_overdue(self, granted: "asyncio.Future[None]") -> None:
        """A refill has waited refill_patience: it may take a free slot from now on."""
        self._overdue.add(granted)
        self._start_refills()

    def _start_refills(self) -> None:
        """Hands free slots to the refills first in line: once no user's start is under way,
        to any; while one is, to one at a time of those that have waited refill_patience;
        while a user waits, to none."""
        while self._taken < self.limit and not any(self._users.values()) and self._refills:
            first = self._refills[0]
            beside_users = self._users_taken and (
                first not in self._overdue or self._taken > self._users_taken
            )
            if not first.done() and beside_users:
                return
            self._refills.popleft()
            if not first.done():  # else it left the line
                first.set_result(None)  # the slot is the refill's
                self._taken += 1

    def _users_idle(self) -> bool:
        return self._users_taken == 0 and not any(self._users.values())


def _hand_over(line: collections.deque[asyncio.Future[None]]) -> bool:
    """Grants the slot to the first waiter in `line` still waiting; False when none is."""
    while line:
        waiter = line.popleft()
        if not waiter.done():
            waiter.set_result(None)  # the slot changes hands: still taken
            return True
    return False


class Quotas:
    def __init__(
        self,
        max_sandboxes_per_project: int,
        max_executes_per_minute: int,
        max_concurrent_creates: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sandboxes_per_project = max_sandboxes_per_project
        self.max_executes_per_minute = max_executes_per_minute
        self.create_slots = CreateSlots(max_concurrent_creates)
        self._clock = clock
        self._executes: dict[str, collections.deque[float]] = {}

    def __repr__(self) -> str:
        return (
            f"<Quotas sandboxes/project={self.max_sandboxes_per_project} "
            f"executes/min={self.max_executes_per_minute} {self.create_slots!r}>"
        )

    def check_sandbox_count(self, project: str, live: int, starting: int = 0) -> None:
        """QuotaExceeded when `live` sandboxes and `starting` more being created leave
        the project no room for one more."""
        if live + starting >= self.max_sandboxes_per_project:
            raise QuotaExceeded(project, live, self.max_sandboxes_per_project, starting)

    def count_execute(self, project: str) -> None:
        now = self._clock()
        recent = self._executes.setdefault(project, collections.deque())
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= self.max_executes_per_minute:
            raise ResourceExhausted(
                f"project {project!r} ran {len(recent)} executions in the last minute, its "
                f"quota of {self.max_executes_per_minute} per minute: retry later",
                **_quota("max_executes_per_minute", self.max_executes_per_minute),
            )
        recent.append(now)


def _quota(quota: str, limit: int) -> dict[str, Any]:
    """The error details of a project quota reached: its name in the config, and its value."""
    return {"reason": "QUOTA_EXCEEDED", "metadata": {"quota": quota, "limit": str(limit)}}
