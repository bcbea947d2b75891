"""The registry of sandboxes, as the domain sees it: a small protocol in terms of records.

SQLite (controller.store.sqlite) is the embedded implementation, PostgreSQL
(controller.store.postgres) the one several controllers share; another database plugs in by
implementing this. Rows are keyed by uid; names are unique among live sandboxes.

States and what the queries see (controller.records.State):
- live: every state but DELETED (tombstones), warm pool members (WARMING, POOLED) included;
- shown (List, quotas): PROVISIONING, RUNNING, DEPROVISIONING, TERMINATED, PAUSED only;
- a tombstone: state DELETED, its delete_time and delete_reason say when and why.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from controller.errors import AlreadyExists
from controller.listing import ListQuery as ListQuery  # re-exported: callers name it from here
from controller.records import SandboxRecord, State


def already_exists(project: object, sandbox_id: object) -> AlreadyExists:
    """What insert and claim_pool_member raise when the name or the request_id is taken."""
    return AlreadyExists(
        f"sandbox projects/{project}/sandboxes/{sandbox_id} already exists; pick another "
        "sandbox_id or delete it"
    )


class Registry(Protocol):
    async def open(self) -> None:
        """Opens the store, creating or migrating its schema."""

    async def close(self) -> None: ...

    async def insert(self, record: SandboxRecord, quota: int | None = None) -> None:
        """Adds a sandbox; AlreadyExists when its name or its request_id is taken. With a
        quota, only while its project has fewer shown sandboxes (count_live) than that,
        counted and added atomically, whoever else adds some at once (another process, another
        host): QuotaExceeded when it has as many."""

    async def set_fields(self, uid: str, **fields: object) -> bool:
        """Writes only the given fields (SandboxRecord's names and types) of a live sandbox;
        False when there is none. Targeted writes, never a whole record: an execution finishing
        must not undo an update made meanwhile, nor an update bring a deleted sandbox back.
        A delete_time makes the row a tombstone (state DELETED), as tombstone() does."""

    async def set_fields_in(self, uid: str, current: State, **fields: object) -> bool:
        """set_fields of a sandbox in state `current` only: False in another (a transition
        that raced another one)."""

    async def set_fields_held(self, uid: str, node: str, **fields: object) -> bool:
        """set_fields of a sandbox whose row names `node` only (the node holding its
        container): False once a drain switched it to another node."""

    def set_fields_soon(self, uid: str, **fields: object) -> None:
        """set_fields without waiting, for bookkeeping that must not delay a reply: every read
        issued after this call sees the write; a failure is logged."""

    async def tombstone(self, uid: str, reason: str, when: datetime) -> bool:
        """Makes a live sandbox a tombstone (state DELETED) that says when and why; False when
        it is not live."""

    async def claim_pool_member(self, uid: str, quota: int | None = None, **fields: object) -> bool:
        """Moves a warm pool member from POOLED to RUNNING with its claimant's fields (project,
        sandbox_id, labels...); False when it is not POOLED. AlreadyExists when the name or the
        request_id is taken in that project; with a quota, QuotaExceeded as insert()."""

    async def forget(self, uid: str) -> None:
        """Removes a sandbox's row entirely: for one that never existed for its caller."""

    async def get_live(self, project: str, sandbox_id: str) -> SandboxRecord | None: ...

    async def get_latest_tombstone(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        """The most recently deleted sandbox of that name."""

    async def get_by_request_id(self, project: str, request_id: str) -> SandboxRecord | None:
        """The sandbox, live or a tombstone, that the Create with this request_id made."""

    async def list_live(self) -> list[SandboxRecord]:
        """Every live sandbox of every project, warm pool members included."""

    async def count_live(self, project: str) -> int:
        """How many of the project's sandboxes count toward its quota: the shown ones."""

    async def count_by_state(self) -> dict[State, int]:
        """How many live sandboxes of every project are in each state (for the metrics)."""

    async def list_expired(self, now: datetime, limit: int) -> list[SandboxRecord]:
        """Live sandboxes (warm pool members included) whose expire_time has come, the earliest
        first."""

    async def list_auto_pause_due(
        self, now: datetime, limit: int, held: Mapping[str, datetime | None]
    ) -> list[SandboxRecord]:
        """RUNNING sandboxes whose auto_pause_after (when not zero) has passed since their
        last_active_time, the longest idle first; none that `held` (uid -> last_active_time)
        names with its last_active_time unchanged, or with None."""

    async def list_unsaved_idle(
        self, idle_since: datetime, limit: int, held: Mapping[str, datetime | None]
    ) -> list[SandboxRecord]:
        """RUNNING sandboxes whose last_active_time is at or before `idle_since` and after
        their checkpoint's (or that have none), the longest idle first; none that `held`
        (uid -> last_active_time) names with its last_active_time unchanged, or with None."""

    async def purge_tombstones(self, deleted_before: datetime) -> int:
        """Forgets the tombstones deleted before the given time; returns how many."""

    async def list_page(self, query: ListQuery) -> list[SandboxRecord]:
        """One page of a project's shown sandboxes (see controller.listing)."""
