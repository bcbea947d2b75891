"""The registry in one SQLite file, the controller's memory across restarts.

All statements run on one dedicated thread (SQLite connections are not shared between threads
here), so callers await them without blocking the event loop and writes never interleave.
"""

import asyncio
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from controller.errors import QuotaExceeded
from controller.listing import ListQuery, micros_since_epoch
from controller.records import SandboxRecord, State
from controller.store import filters, schema, table
from controller.store.registry import already_exists
from controller.store.schema import LIVE, SHOWN

T = TypeVar("T")
log = structlog.get_logger()


def _log_failure(future: "asyncio.Future[bool]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a deferred registry write failed", error=str(future.exception()))


class SqliteRegistry:
    """The Registry protocol (controller.store.registry) on SQLite."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<SqliteRegistry {self._path} open={self._db is not None}>"

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None)  # autocommit; BEGIN explicitly
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # durable across crashes of the process
            db.execute("PRAGMA busy_timeout = 5000")
            schema.prepare(db, self._path)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("registry is not open")
        return self._db

    # --- writes ---------------------------------------------------------------------------

    async def insert(self, record: SandboxRecord, quota: int | None = None) -> None:
        await self._run(self._within_quota, record.project, quota, self._insert, record)

    def _insert(self, record: SandboxRecord) -> None:
        try:
            self._conn.execute(table.insert_sql(), table.to_row(record))
        except sqlite3.IntegrityError as exc:
            raise already_exists(record.project, record.sandbox_id) from exc

    def _within_quota(
        self, project: str, quota: int | None, write: Callable[..., T], *args: Any
    ) -> T:
        """`write(*args)`, only while the project has fewer than `quota` shown sandboxes: the
        count and the write in one transaction (IMMEDIATE: another process's waits)."""
        if quota is None:
            return write(*args)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            live = self._count_shown(project)
            if live >= quota:
                raise QuotaExceeded(project, live, quota)
            result = write(*args)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    async def set_fields(self, uid: str, **fields: object) -> bool:
        return await self._run(self._set_fields, uid, fields)

    async def set_fields_in(self, uid: str, current: State, **fields: object) -> bool:
        return await self._run(self._set_fields, uid, fields, current)

    async def set_fields_held(self, uid: str, node: str, **fields: object) -> bool:
        return await self._run(self._set_fields, uid, fields, None, node)

    def set_fields_soon(self, uid: str, **fields: object) -> None:
        future = asyncio.get_running_loop().run_in_executor(
            self._thread, self._set_fields, uid, fields
        )
        future.add_done_callback(_log_failure)

    async def tombstone(self, uid: str, reason: str, when: datetime) -> bool:
        fields: dict[str, object] = {"delete_time": when, "delete_reason": reason}
        return await self._run(self._set_fields, uid, {**fields, "update_time": when})

    def _set_fields(
        self,
        uid: str,
        fields: dict[str, object],
        only_in: State | None = None,
        held_by: str | None = None,
    ) -> bool:
        """UPDATE of a live row (and in state `only_in`, and naming node `held_by`, if given)."""
        row = table.encode_update(fields)
        assignments = ", ".join(f"{name} = :{name}" for name in row)
        condition = "" if only_in is None else f" AND state = {int(only_in)}"
        if held_by is not None:
            condition += " AND node = :held_by"
        cursor = self._conn.execute(
            f"UPDATE sandboxes SET {assignments} WHERE uid = :uid AND {LIVE}{condition}",
            {**row, "uid": uid, "held_by": held_by},
        )
        return cursor.rowcount == 1

    async def claim_pool_member(self, uid: str, quota: int | None = None, **fields: object) -> bool:
        if "state" in fields:
            raise ValueError("a claim sets the state: RUNNING")
        project = str(fields.get("project", ""))
        return await self._run(
            self._within_quota, project, quota, self._claim_pool_member, uid, fields
        )

    def _claim_pool_member(self, uid: str, fields: dict[str, object]) -> bool:
        try:
            return self._set_fields(uid, {**fields, "state": State.RUNNING}, State.POOLED)
        except sqlite3.IntegrityError as exc:
            raise already_exists(fields.get("project"), fields.get("sandbox_id")) from exc

    async def forget(self, uid: str) -> None:
        await self._run(self._conn.execute, "DELETE FROM sandboxes WHERE uid = ?", (uid,))

    async def purge_tombstones(self, deleted_before: datetime) -> int:
        return await self._run(self._purge, micros_since_epoch(deleted_before))

    def _purge(self, before: int) -> int:
        cursor = self._conn.execute(
            f"DELETE FROM sandboxes WHERE state = {int(State.DELETED)} AND delete_time < ?",
            (before,),
        )
        return cursor.rowcount

    # --- reads ----------------------------------------------------------------------------

    async def get_live(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        return await self._run(
            self._one,
            f"SELECT * FROM sandboxes WHERE project = ? AND sandbox_id = ? AND {LIVE}",
            (project, sandbox_id),
        )

    async def get_latest_tombstone(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        return await self._run(
            self._one,
            "SELECT * FROM sandboxes WHERE project = ? AND sandbox_id = ? "
            f"AND state = {int(State.DELETED)} ORDER BY delete_time DESC LIMIT 1",
            (project, sandbox_id),
        )

    async def get_by_request_id(self, project: str, request_id: str) -> SandboxRecord | None:
        return await self._run(
            self._one,
            "SELECT * FROM sandboxes WHERE project = ? AND request_id = ?",
            (project, request_id),
        )

    async def list_live(self) -> list[SandboxRecord]:
        return await self._run(self._many, f"SELECT * FROM sandboxes WHERE {LIVE}", ())

    async def count_live(self, project: str) -> int:
        return await self._run(self._count_shown, project)

    def _count_shown(self, project: str) -> int:
        row = self._conn.execute(
            f"SELECT COUNT(*) FROM sandboxes WHERE project = ? AND {SHOWN}", (project,)
        ).fetchone()
        return int(row[0])

    async def count_by_state(self) -> dict[State, int]:
        return await self._run(self._count_by_state)

    def _count_by_state(self) -> dict[State, int]:
        rows = self._conn.execute(
            f"SELECT state, COUNT(*) FROM sandboxes WHERE {LIVE} GROUP BY state"
        ).fetchall()
        return {State(row[0]): int(row[1]) for row in rows}

    async def list_expired(self, now: datetime, limit: int) -> list[SandboxRecord]:
        return await self._run(
            self._many,
            f"SELECT * FROM sandboxes WHERE {LIVE} AND expire_time <= ? "
            "ORDER BY expire_time, uid LIMIT ?",
            (micros_since_epoch(now), limit),
        )

    async def list_auto_pause_due(
        self, now: datetime, limit: int, held: Mapping[str, datetime | None]
    ) -> list[SandboxRecord]:
        return await self._run(
            self._many,
            f"SELECT * FROM sandboxes WHERE state = {int(State.RUNNING)} "
            f"AND auto_pause_after > 0 AND last_active_time + auto_pause_after <= ? {_NOT_HELD} "
            "ORDER BY last_active_time, uid LIMIT ?",
            (micros_since_epoch(now), *_held_json(held), limit),
        )

    async def list_unsaved_idle(
        self, idle_since: datetime, limit: int, held: Mapping[str, datetime | None]
    ) -> list[SandboxRecord]:
        return await self._run(
            self._many,
            f"SELECT * FROM sandboxes WHERE state = {int(State.RUNNING)} "
            "AND last_active_time <= ? AND (checkpoint IS NULL OR "
            f"json_extract(checkpoint, '$.create_time') < last_active_time) {_NOT_HELD} "
            "ORDER BY last_active_time, uid LIMIT ?",
            (micros_since_epoch(idle_since), *_held_json(held), limit),
        )

    async def list_page(self, query: ListQuery) -> list[SandboxRecord]:
        return await self._run(self._many, *filters.compile_page(query))

    def _one(self, sql: str, params: Sequence[object]) -> SandboxRecord | None:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else table.from_row(row)

    def _many(self, sql: str, params: Sequence[object]) -> list[SandboxRecord]:
        return [table.from_row(row) for row in self._conn.execute(sql, params).fetchall()]


# Rows `held` names with None, or with their last_active_time unchanged, are left out (a JSON
# object, given twice, however many; subqueries that do not depend on the row: read once).
_NOT_HELD = (
    "AND uid NOT IN (SELECT key FROM json_each(?) WHERE type = 'null') "
    "AND (uid, last_active_time) NOT IN (SELECT key, value FROM json_each(?) WHERE type != 'null')"
)


def _held_json(held: Mapping[str, datetime | None]) -> tuple[str, str]:
    encoded = json.dumps(
        {uid: None if time is None else micros_since_epoch(time) for uid, time in held.items()}
    )
    return encoded, encoded
