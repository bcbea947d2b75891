"""Per-project quotas and the server's concurrency limits: RESOURCE_EXHAUSTED, naming the
limit, rather than a slow or fallen-over service."""

import collections
import time
from collections.abc import Callable
from typing import Any

from controller.errors import ResourceExhausted

WINDOW_SECONDS = 60.0


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
        self.max_concurrent_creates = max_concurrent_creates
        self._clock = clock
        self._creating = 0
        self._executes: dict[str, collections.deque[float]] = {}

    def __repr__(self) -> str:
        return (
            f"<Quotas sandboxes/project={self.max_sandboxes_per_project} "
            f"executes/min={self.max_executes_per_minute} creating={self._creating}"
            f"/{self.max_concurrent_creates}>"
        )

    def check_sandbox_count(self, project: str, live: int) -> None:
        if live >= self.max_sandboxes_per_project:
            raise ResourceExhausted(
                f"project {project!r} has {live} sandboxes, its quota of "
                f"{self.max_sandboxes_per_project}: delete some first",
                **_quota("max_sandboxes_per_project", self.max_sandboxes_per_project),
            )

    def take_create_slot(self) -> None:
        """Claims one of the creates in progress; give it back with release_create_slot when
        the sandbox is created or failed (not when its caller gives up: it is still being
        created)."""
        if self._creating >= self.max_concurrent_creates:
            raise ResourceExhausted(
                f"the server is already creating {self._creating} sandboxes, its limit of "
                f"{self.max_concurrent_creates} at once: retry in a moment"
            )
        self._creating += 1

    def try_take_create_slot(self) -> bool:
        """take_create_slot for the warm pool's refills: False instead of an error."""
        if self._creating >= self.max_concurrent_creates:
            return False
        self._creating += 1
        return True

    def release_create_slot(self) -> None:
        self._creating -= 1

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
