"""The registry in PostgreSQL: one database that several controllers share.

The same semantics as controller.store.sqlite, statement for statement; where two controllers
could race, the database decides: unique indexes for names and request ids, a transaction
under an advisory lock per project for the quota. Connections come from a pool that replaces
broken ones by itself: while the database does not answer, calls fail with Unavailable, and
they work again once it is back, without a restart.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from controller.config import redact_url, url_passwords
from controller.errors import InvalidArgument, QuotaExceeded, Unavailable
from controller.listing import Condition, LabelIs, ListQuery, SortKey, micros_since_epoch
from controller.records import SandboxRecord, State
from controller.store import filters, pg_schema, table
from controller.store.registry import already_exists
from controller.store.schema import LIVE, SHOWN

log = structlog.get_logger()

NOT_ANSWERING = (
    "the registry's database is not answering: retrying is safe for reads and for a "
    "CreateSandbox that carries a request_id; any other change may or may not have been "
    "made, so read before repeating it"
)

_INSERT = (
    f"INSERT INTO sandboxes ({', '.join(table.NAMES)}) "
    f"VALUES ({', '.join(f'%({name})s' for name in table.NAMES)})"
)
_COUNT_SHOWN = f"SELECT count(*) FROM sandboxes WHERE project = %s AND {SHOWN}"
# Within a transaction: waits for the other controllers adding a sandbox to the same project.
_LOCK_PROJECT = f"SELECT pg_advisory_xact_lock({pg_schema.PROJECT_LOCK_CLASS}, hashtext(%s))"
# Rows `held` names with None (the first array), or with their last_active_time unchanged
# (the other two, side by side), are left out.
_NOT_HELD = (
    "AND NOT (uid = ANY(%s::text[])) AND (uid, last_active_time) NOT IN "
    "(SELECT * FROM unnest(%s::text[], %s::bigint[]))"
)
# The rows of this registry's node: those whose containers are on its host.
_OWN = "AND node = %s"
# No stored label value holds this character (they match [a-z0-9_-]*), nor NUL, which
# PostgreSQL's text cannot carry: a filter's value with NUL compares the same with this instead.
_NOT_IN_ANY_LABEL = "\ufffd"


class PostgresRegistry:
    """The Registry protocol (controller.store.registry) on PostgreSQL. `url` is libpq's
    (postgresql://...); it is shown only with its password masked.

    `node` is the controller's node name when several share the database (role node; ""
    for role single): the rows it adds say so, and what only makes sense for the containers
    of its own host (list_live, list_expired, list_auto_pause_due, list_unsaved_idle,
    count_by_state) sees its own rows only. Names, request ids, quotas (count_live), Get and
    List span every node."""

    def __init__(
        self, url: str, *, node: str = "", timeout: float = 5.0, max_connections: int = 10
    ) -> None:
        self._url = url
        self.node = node
        self._shown_url = redact_url(url)
        # How long a call waits for a connection before it fails with Unavailable.
        self._timeout = timeout
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout))},
            # A connection the database dropped (a restart) is replaced before it is used.
            check=AsyncConnectionPool.check_connection,
            timeout=timeout,
            # A reconnection gives up as soon as the call that wanted it: the next call tries
            # at once, so calls work again as soon as the database is back, not after a backoff
            # as long as the outage was.
            reconnect_timeout=timeout,
            name="registry",
        )
        self._opened = False
        # The last of set_fields_soon's writes, which run one after another: every other
        # call waits for it first.
        self._deferred: asyncio.Future[bool] | None = None

    def __repr__(self) -> str:
        return f"<PostgresRegistry {self._shown_url} node={self.node!r} open={self._opened}>"

    def _scrub(self, text: str) -> str:
        for secret in url_passwords(self._url):
            text = text.replace(secret, "***")
        return text

    async def open(self) -> None:
        """Migrates the schema (see pg_schema), then opens the pool. DatabaseUnusable naming
        the database (its password masked) when it cannot be reached; SchemaTooNew when a newer
        controller migrated it."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=max(1, round(self._timeout))
            )
        except psycopg.Error as exc:
            raise pg_schema.DatabaseUnusable(
                f"cannot reach the registry's database {self._shown_url}: "
                f"{self._scrub(str(exc)).strip()[:500]}"
            ) from None
        try:
            await pg_schema.migrate(conn)
        finally:
            await conn.close()  # releases the migration lock
        try:
            await self._pool.open(wait=True, timeout=self._timeout)
        except psycopg.Error as exc:
            await self._pool.close()
            raise pg_schema.DatabaseUnusable(
                f"cannot reach the registry's database {self._shown_url}: "
                f"{self._scrub(str(exc)).strip()[:500]}"
            ) from None
        self._opened = True

    async def close(self) -> None:
        if self._deferred is not None:
            await asyncio.wait([self._deferred])
        await self._pool.close()
        self._opened = False

    @asynccontextmanager
    async def connection(
        self, *, after_deferred: bool = True
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the pool (autocommit: one statement, one transaction), after the
        deferred writes issued before; Unavailable when the database does not answer. For
        the store's other tables on the same database (controller.store.nodes)."""
        deferred = self._deferred
        if after_deferred and deferred is not None and not deferred.done():
            await asyncio.wait([deferred])
        try:
            async with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            log.warning(
                "the registry's database is not answering",
                error=f"{type(exc).__name__}: {self._scrub(str(exc)).strip()[:500]}",
            )
            raise Unavailable(NOT_ANSWERING) from exc

    async def _execute(self, sql: str, params: Sequence[object] | Mapping[str, object]) -> int:
        """Runs one statement; how many rows it changed."""
        async with self.connection() as conn:
            cursor = await conn.execute(sql, params)
            return int(cursor.rowcount)

    async def _fetch(
        self, sql: str, params: Sequence[object] | Mapping[str, object]
    ) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(sql, params)
            rows: list[dict[str, Any]] = await cursor.fetchall()
            return rows

    async def _one(self, sql: str, params: Sequence[object]) -> SandboxRecord | None:
        rows = await self._fetch(sql, params)
        return table.from_row(rows[0]) if rows else None

    async def _many(self, sql: str, params: Sequence[object]) -> list[SandboxRecord]:
        return [table.from_row(row) for row in await self._fetch(sql, params)]

    @staticmethod
    async def _hold_room(conn: psycopg.AsyncConnection[Any], project: str, quota: int) -> None:
        """Within a transaction: takes the project's lock (released at its end), and raises
        QuotaExceeded unless the project has fewer than `quota` shown sandboxes."""
        await conn.execute(_LOCK_PROJECT, (project,))
        cursor = await conn.execute(_COUNT_SHOWN, (project,))
        row = await cursor.fetchone()
        live = int(row[0]) if row is not None else 0
        if live >= quota:
            raise QuotaExceeded(project, live, quota)

    # --- writes ---------------------------------------------------------------------------

    async def insert(self, record: SandboxRecord, quota: int | None = None) -> None:
        row = {**table.to_row(record), "node": self.node}  # its container is on this host
        async with self.connection() as conn:
            try:
                if quota is None:
                    await conn.execute(_INSERT, row)
                    return
                async with conn.transaction():
                    await self._hold_room(conn, record.project, quota)
                    await conn.execute(_INSERT, row)
            except psycopg.errors.UniqueViolation as exc:
                raise already_exists(record.project, record.sandbox_id) from exc

    async def set_fields(self, uid: str, **fields: object) -> bool:
        return await self._set_fields(uid, fields)

    async def set_fields_in(self, uid: str, current: State, **fields: object) -> bool:
        return await self._set_fields(uid, fields, current)

    async def set_fields_held(self, uid: str, node: str, **fields: object) -> bool:
        return await self._set_fields(uid, fields, held_by=node)

    def set_fields_soon(self, uid: str, **fields: object) -> None:
        previous = self._deferred

        async def write() -> bool:
            if previous is not None:
                await asyncio.wait([previous])  # in the order they were issued
            return await self._set_fields(uid, fields, after_deferred=False)

        future = asyncio.ensure_future(write())
        future.add_done_callback(_log_failure)
        self._deferred = future

    async def tombstone(self, uid: str, reason: str, when: datetime) -> bool:
        fields: dict[str, object] = {"delete_time": when, "delete_reason": reason}
        return await self._set_fields(uid, {**fields, "update_time": when})

    @staticmethod
    def _update_sql(
        uid: str, fields: dict[str, object], only_in: State | None, held_by: str | None = None
    ) -> Any:
        row = table.encode_update(fields)
        assignments = ", ".join(f"{name} = %({name})s" for name in row)
        condition = "" if only_in is None else f" AND state = {int(only_in)}"
        if held_by is not None:
            condition += " AND node = %(held_by)s"
        sql = f"UPDATE sandboxes SET {assignments} WHERE uid = %(uid)s AND {LIVE}{condition}"
        return sql, {**row, "uid": uid, "held_by": held_by}

    async def _set_fields(
        self,
        uid: str,
        fields: dict[str, object],
        only_in: State | None = None,
        *,
        after_deferred: bool = True,
        held_by: str | None = None,
    ) -> bool:
        """UPDATE of a live row (and in state `only_in`, and naming node `held_by`, if given)."""
        sql, params = self._update_sql(uid, fields, only_in, held_by)
        async with self.connection(after_deferred=after_deferred) as conn:
            cursor = await conn.execute(sql, params)
            return bool(cursor.rowcount == 1)

    async def claim_pool_member(self, uid: str, quota: int | None = None, **fields: object) -> bool:
        if "state" in fields:
            raise ValueError("a claim sets the state: RUNNING")
        claim = {**fields, "state": State.RUNNING, "node": self.node}
        sql, params = self._update_sql(uid, claim, State.POOLED)
        async with self.connection() as conn:
            try:
                if quota is None:
                    cursor = await conn.execute(sql, params)
                else:
                    async with conn.transaction():
                        await self._hold_room(conn, str(fields.get("project", "")), quota)
                        cursor = await conn.execute(sql, params)
            except psycopg.errors.UniqueViolation as exc:
                raise already_exists(fields.get("project"), fields.get("sandbox_id")) from exc
            return bool(cursor.rowcount == 1)

    async def forget(self, uid: str) -> None:
        await self._execute("DELETE FROM sandboxes WHERE uid = %s", (uid,))

    async def purge_tombstones(self, deleted_before: datetime) -> int:
        return await self._execute(
            f"DELETE FROM sandboxes WHERE state = {int(State.DELETED)} AND delete_time < %s",
            (micros_since_epoch(deleted_before),),
        )

    # --- reads ----------------------------------------------------------------------------

    async def get_live(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        return await self._one(
            f"SELECT * FROM sandboxes WHERE project = %s AND sandbox_id = %s AND {LIVE}",
            (project, sandbox_id),
        )

    async def get_latest_tombstone(self, project: str, sandbox_id: str) -> SandboxRecord | None:
        return await self._one(
            "SELECT * FROM sandboxes WHERE project = %s AND sandbox_id = %s "
            f"AND state = {int(State.DELETED)} ORDER BY delete_time DESC LIMIT 1",
            (project, sandbox_id),
        )

    async def get_by_request_id(self, project: str, request_id: str) -> SandboxRecord | None:
        return await self._one(
            "SELECT * FROM sandboxes WHERE project = %s AND request_id = %s",
            (project, request_id),
        )

    async def list_live(self) -> list[SandboxRecord]:
        return await self._many(f"SELECT * FROM sandboxes WHERE {LIVE} {_OWN}", (self.node,))

    async def count_live(self, project: str) -> int:
        rows = await self._fetch(_COUNT_SHOWN, (project,))
        return int(rows[0]["count"])

    async def count_by_state(self) -> dict[State, int]:
        rows = await self._fetch(
            f"SELECT state, count(*) AS n FROM sandboxes WHERE {LIVE} {_OWN} GROUP BY state",
            (self.node,),
        )
        return {State(row["state"]): int(row["n"]) for row in rows}

    async def list_expired(self, now: datetime, limit: int) -> list[SandboxRecord]:
        return await self._many(
            f"SELECT * FROM sandboxes WHERE {LIVE} {_OWN} AND expire_time <= %s "
            "ORDER BY expire_time, uid LIMIT %s",
            (self.node, micros_since_epoch(now), limit),
        )

    async def list_auto_pause_due(
        self, now: datetime, limit: int, held: Mapping[str, datetime | None]
    ) -> list[SandboxRecord]:
        return await self._many(
            f"SELECT * FROM sandboxes WHERE state = {int(State.RUNNING)} {_OWN} "
            f"AND auto_pause_after > 0 AND last_active_time + auto_pause_after <= %s {_NOT_HELD} "
            "ORDER BY last_active_time, uid LIMIT %s",
            (self.node, micros_since_epoch(now), *_held_arrays(held), limit),
        )

    async def list_unsaved_idle(
        self, idle_since: datetime, limit: int, held: Mapping[str, datetime | None]
    ) -> list[SandboxRecord]:
        return await self._many(
            f"SELECT * FROM sandboxes WHERE state = {int(State.RUNNING)} {_OWN} "
            "AND last_active_time <= %s AND (checkpoint IS NULL OR "
            f"(checkpoint::jsonb ->> 'create_time')::bigint < last_active_time) {_NOT_HELD} "
            "ORDER BY last_active_time, uid LIMIT %s",
            (self.node, micros_since_epoch(idle_since), *_held_arrays(held), limit),
        )

    async def list_page(self, query: ListQuery) -> list[SandboxRecord]:
        return await self._many(*filters.compile_page(_storable(query), filters.POSTGRES))


def _log_failure(future: "asyncio.Future[bool]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a deferred registry write failed", error=str(future.exception()))


def _held_arrays(held: Mapping[str, datetime | None]) -> tuple[list[str], list[str], list[int]]:
    """`held` as the three arrays _NOT_HELD compares with."""
    gone = [uid for uid, time in held.items() if time is None]
    kept = [(uid, micros_since_epoch(time)) for uid, time in held.items() if time is not None]
    return gone, [uid for uid, _ in kept], [micros for _, micros in kept]


def _storable(query: ListQuery) -> ListQuery:
    """The query with values PostgreSQL can compare: InvalidArgument for a position of the
    wrong kind for its order (SQLite would compare any two values; PostgreSQL refuses), or
    with NUL, which no name holds and PostgreSQL's text cannot carry."""
    if query.after is not None:
        value, uid = query.after
        by_name = query.sort_key is SortKey.NAME
        if isinstance(value, bool) or isinstance(value, str) != by_name or "\0" in f"{value}{uid}":
            raise InvalidArgument(
                "invalid page_token: pass the next_page_token of the previous ListSandboxes "
                "call, with the same parent, filter and order_by"
            )
    conditions: list[Condition] = []
    for condition in query.conditions:
        if isinstance(condition, LabelIs) and "\0" in condition.value:
            value = condition.value.replace("\0", _NOT_IN_ANY_LABEL)
            condition = replace(condition, value=value)
        conditions.append(condition)
    return replace(query, conditions=tuple(conditions))
