"""The sandbox registry: one SQLite database, the controller's memory across restarts.

All statements run on one dedicated thread (SQLite connections are not shared between threads
here), so callers await them without blocking the event loop and writes never interleave.
Deleted sandboxes stay as tombstones (delete_time set) so that Get can tell "deleted at" from
"never existed".
"""

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from controller.errors import AlreadyExists
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec, State

T = TypeVar("T")
log = structlog.get_logger()

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    uid              TEXT PRIMARY KEY,
    project          TEXT NOT NULL,
    sandbox_id       TEXT NOT NULL,
    display_name     TEXT NOT NULL,
    labels           TEXT NOT NULL,          -- JSON object
    spec             TEXT NOT NULL,          -- JSON object
    state            INTEGER NOT NULL,
    state_message    TEXT NOT NULL,
    create_time      INTEGER NOT NULL,       -- microseconds since the epoch, UTC
    update_time      INTEGER NOT NULL,
    expire_time      INTEGER NOT NULL,
    last_active_time INTEGER NOT NULL,
    execution_count  INTEGER NOT NULL,
    incarnation      TEXT NOT NULL,
    request_id       TEXT,
    create_request   TEXT,                   -- JSON: the Create that request_id names
    container_name   TEXT NOT NULL,
    socket_dir       TEXT NOT NULL,
    delete_time      INTEGER,
    delete_reason    TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS live_sandbox_names
    ON sandboxes (project, sandbox_id) WHERE delete_time IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS request_ids
    ON sandboxes (project, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS live_by_project
    ON sandboxes (project, create_time, uid) WHERE delete_time IS NULL;
CREATE INDEX IF NOT EXISTS live_by_expiry
    ON sandboxes (expire_time) WHERE delete_time IS NULL;
"""
# Columns a version-1 registry written by an older controller may lack, with their types.
_ADDED_COLUMNS = {"create_request": "TEXT"}

_COLUMNS = [
    "uid",
    "project",
    "sandbox_id",
    "display_name",
    "labels",
    "spec",
    "state",
    "state_message",
    "create_time",
    "update_time",
    "expire_time",
    "last_active_time",
    "execution_count",
    "incarnation",
    "request_id",
    "create_request",
    "container_name",
    "socket_dir",
    "delete_time",
    "delete_reason",
]


def _micros(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1_000_000)


def _time(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1_000_000, UTC)


def _spec_to_json(spec: Spec) -> str:
    resources = spec.resources
    return json.dumps(
        {
            "image_profile": spec.image_profile,
            "runtime": spec.runtime.name,
            "resources": {
                "cpu_millis": resources.cpu_millis,
                "memory_bytes": resources.memory_bytes,
                "disk_bytes": resources.disk_bytes,
                "max_processes": resources.max_processes,
            },
        }
    )


def _spec_from_json(text: str) -> Spec:
    data = json.loads(text)
    return Spec(
        image_profile=data["image_profile"],
        runtime=Runtime[data["runtime"]],
        resources=Resources(**data["resources"]),
    )


def _to_row(record: SandboxRecord) -> dict[str, Any]:
    return {
        "uid": record.uid,
        "project": record.project,
        "sandbox_id": record.sandbox_id,
        "display_name": record.display_name,
        "labels": json.dumps(record.labels, sort_keys=True),
        "spec": _spec_to_json(record.spec),
        "state": int(record.state),
        "state_message": record.state_message,
        "create_time": _micros(record.create_time),
        "update_time": _micros(record.update_time),
        "expire_time": _micros(record.expire_time),
        "last_active_time": _micros(record.last_active_time),
        "execution_count": record.execution_count,
        "incarnation": record.incarnation,
        "request_id": record.request_id,
        "create_request": record.create_request,
        "container_name": record.container_name,
        "socket_dir": record.socket_dir,
        "delete_time": _micros(record.delete_time),
        "delete_reason": record.delete_reason,
    }


def _column_value(name: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return _micros(value)
    if name == "labels":
        return json.dumps(value, sort_keys=True)
    if name == "state":
        return int(value)
    return value


def _from_row(row: sqlite3.Row) -> SandboxRecord:
    create_time = _time(row["create_time"])
    update_time = _time(row["update_time"])
    expire_time = _time(row["expire_time"])
    last_active_time = _time(row["last_active_time"])
    assert create_time and update_time and expire_time and last_active_time
    return SandboxRecord(
        uid=row["uid"],
        project=row["project"],
        sandbox_id=row["sandbox_id"],
        display_name=row["display_name"],
        labels=json.loads(row["labels"]),
        spec=_spec_from_json(row["spec"]),
        state=State(row["state"]),
        state_message=row["state_message"],
        create_time=create_time,
        update_time=update_time,
        expire_time=expire_time,
        last_active_time=last_active_time,
        execution_count=row["execution_count"],
        incarnation=row["incarnation"],
        request_id=row["request_id"],
        create_request=row["create_request"],
        container_name=row["container_name"],
        socket_dir=row["socket_dir"],
        delete_time=_time(row["delete_time"]),
        delete_reason=row["delete_reason"],
    )


def _log_failure(future: "asyncio.Future[bool]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a deferred registry write failed", error=str(future.exception()))


@dataclass(frozen=True)
class ListQuery:
    """A page of live sandboxes of one project.

    `where` is an SQL condition over the sandboxes table with `?` placeholders for `params`;
    `order_column` is a column name; `after` is the (order value, uid) of the last row of the
    previous page.
    """

    project: str
    where: str
    params: Sequence[Any]
    order_column: str
    descending: bool
    limit: int
    after: tuple[Any, str] | None = None


class Registry:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<Registry {self._path} open={self._db is not None}>"

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
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # durable across crashes of the process
        db.execute("PRAGMA busy_timeout = 5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise RuntimeError(
                f"registry {self._path} has schema version {version}, newer than this "
                f"controller's {_SCHEMA_VERSION}: upgrade the controller"
            )
        db.executescript(_SCHEMA)
        # Columns added since version 1; older controllers read rows by name and ignore them.
        present = {row["name"] for row in db.execute("PRAGMA table_info(sandboxes)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE sandboxes ADD COLUMN {column} {kind}")
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("registry is not open")
        return self._db

    async def insert(self, record: SandboxRecord) -> None:
        """Adds a sandbox; AlreadyExists when its name or request_id is taken."""
        await self._run(self._insert, record)

    def _insert(self, record: SandboxRecord) -> None:
        row = _to_row(record)
        placeholders = ", ".join(f":{c}" for c in _COLUMNS)
        try:
            self._conn.execute(
                f"INSERT INTO sandboxes ({', '.join(_COLUMNS)}) VALUES ({placeholders})", row
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(
                f"sandbox {record.name} already exists; pick another sandbox_id or delete it"
            ) from exc

    async def set_fields(self, uid: str, **fields: Any) -> bool:
        """Writes only the given fields of a sandbox that is not deleted; False when it is.

        Targeted writes, never a whole record: an execution finishing must not undo an
        UpdateSandbox that happened meanwhile, nor an update bring a deleted sandbox back.
        """
        return await self._run(self._set_fields, uid, fields)

    def set_fields_soon(self, uid: str, **fields: Any) -> None:
        """set_fields without waiting for it, for bookkeeping that must not delay a reply.
        Statements run in the order they are submitted, so every read submitted after this
        call sees the write; a failure is logged."""
        future = asyncio.get_running_loop().run_in_executor(
            self._thread, self._set_fields, uid, fields
        )
        future.add_done_callback(_log_failure)

    def _set_fields(self, uid: str, fields: dict[str, Any], condition: str = "") -> bool:
        """UPDATE of a live row; `condition` adds SQL over named parameters :pool, :pooled."""
        unknown = set(fields) - set(_COLUMNS) - {"uid"}
        if unknown or "uid" in fields:
            raise ValueError(f"cannot set {sorted(unknown | ({'uid'} & set(fields)))}")
        row = {name: _column_value(name, value) for name, value in fields.items()}
        assignments = ", ".join(f"{name} = :{name}" for name in row)
        cursor = self._conn.execute(
            f"UPDATE sandboxes SET {assignments} WHERE uid = :uid AND delete_time IS NULL"
            + (f" AND {condition}" if condition else ""),
            {**row, "uid": uid, "pool": POOL_PROJECT, "pooled": int(State.POOLED)},
        )
        return cursor.rowcount == 1

    async def claim_pool_member(self, uid: str, **fields: Any) -> bool:
        """Gives a warm pool member its owner's fields (project, sandbox_id, ...), if it is
        still a POOLED member; False when it is not. AlreadyExists when the name or the
        request_id is taken in that project."""
        return await self._run(self._claim_pool_member, uid, fields)

    def _claim_pool_member(self, uid: str, fields: dict[str, Any]) -> bool:
        try:
            return self._set_fields(uid, fields, "project = :pool AND state = :pooled")
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(
                f"sandbox projects/{fields.get('project')}/sandboxes/{fields.get('sandbox_id')} "
                "already exists; pick another sandbox_id or delete it"
            ) from exc

    async def forget(self, uid: str) -> None:
        """Removes a sandbox's row entirely: for one that never existed for its caller."""
        await self._run(self._conn.execute, "DELETE FROM sandboxes WHERE uid = ?", (uid,))

    async def get_live(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        return await self._run(
            self._one,
            "SELECT * FROM sandboxes WHERE project = ? AND sandbox_id = ? AND delete_time IS NULL",
            (project, sandbox_id),
        )

    async def get_latest_tombstone(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        return await self._run(
            self._one,
            "SELECT * FROM sandboxes WHERE project = ? AND sandbox_id = ? "
            "AND delete_time IS NOT NULL ORDER BY delete_time DESC LIMIT 1",
            (project, sandbox_id),
        )

    async def get_by_request_id(self, project: str, request_id: str) -> SandboxRecord | None:
        return await self._run(
            self._one,
            "SELECT * FROM sandboxes WHERE project = ? AND request_id = ?",
            (project, request_id),
        )

    async def list_live(self) -> list[SandboxRecord]:
        """Every sandbox that is not deleted, of every project."""
        return await self._run(self._many, "SELECT * FROM sandboxes WHERE delete_time IS NULL", ())

    async def count_live(self, project: str) -> int:
        return await self._run(self._count_live, project)

    def _count_live(self, project: str) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM sandboxes WHERE project = ? AND delete_time IS NULL", (project,)
        ).fetchone()
        return int(row[0])

    async def list_expired(self, now: datetime, limit: int) -> list[SandboxRecord]:
        """Live sandboxes whose expire_time has come, the earliest first."""
        return await self._run(
            self._many,
            "SELECT * FROM sandboxes WHERE delete_time IS NULL AND expire_time <= ? "
            "ORDER BY expire_time, uid LIMIT ?",
            (_micros(now), limit),
        )

    async def purge_tombstones(self, deleted_before: datetime) -> int:
        """Forgets sandboxes deleted before the given time; returns how many."""
        return await self._run(self._purge, _micros(deleted_before))

    def _purge(self, before: int) -> int:
        cursor = self._conn.execute(
            "DELETE FROM sandboxes WHERE delete_time IS NOT NULL AND delete_time < ?", (before,)
        )
        return cursor.rowcount

    async def list_page(self, query: ListQuery) -> list[SandboxRecord]:
        return await self._run(self._list_page, query)

    def _list_page(self, query: ListQuery) -> list[SandboxRecord]:
        column = query.order_column
        if column not in _COLUMNS:
            raise ValueError(f"cannot order by {column!r}")
        direction = "DESC" if query.descending else "ASC"
        comparison = "<" if query.descending else ">"
        conditions = ["project = ?", "delete_time IS NULL"]
        params: list[Any] = [query.project]
        if query.where:
            conditions.append(f"({query.where})")
            params.extend(query.params)
        if query.after is not None:
            conditions.append(f"({column} {comparison} ? OR ({column} = ? AND uid {comparison} ?))")
            value, uid = query.after
            params.extend([value, value, uid])
        sql = (
            f"SELECT * FROM sandboxes WHERE {' AND '.join(conditions)} "
            f"ORDER BY {column} {direction}, uid {direction} LIMIT ?"
        )
        params.append(query.limit)
        return self._many(sql, params)

    def _one(self, sql: str, params: Sequence[Any]) -> SandboxRecord | None:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else _from_row(row)

    def _many(self, sql: str, params: Sequence[Any]) -> list[SandboxRecord]:
        return [_from_row(row) for row in self._conn.execute(sql, params).fetchall()]


def order_value(record: SandboxRecord, column: str) -> Any:
    """The value of an order_by column, as stored (for page tokens)."""
    return _to_row(record)[column]
