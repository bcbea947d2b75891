"""The nodes sharing one registry in PostgreSQL (role node), as gateways and nodes see them.

Each node heartbeats its row (address, figures) every --heartbeat-interval; a node whose
heartbeat is older than --node-timeout is dead. Times are the database's clock (now()), never
a host's, so that hosts whose clocks disagree still agree on who is dead. What is done about a
dead node's sandboxes, and the tombstone purge, runs under one advisory lock across all nodes
(the sweep lock): whichever node's reaper takes it acts, the others skip that round.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import psycopg
import structlog
from psycopg.rows import dict_row

from controller.listing import micros_since_epoch
from controller.records import State, given_up_message
from controller.store import pg_schema
from controller.store.postgres import PostgresRegistry

log = structlog.get_logger()


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: str  # host:port of the node's gRPC API, for gateways
    heartbeat_time: datetime  # the database's clock at its last heartbeat (written: ignored)
    draining: bool
    sandboxes: int  # sandboxes it holds (shown states)
    max_sandboxes: int  # most it takes (0: no limit), from config
    free_memory: int  # bytes (MemAvailable)
    warm: Mapping[str, int] = field(default_factory=dict)  # ready members by "profile/runtime"
    # How long ago its last heartbeat was, by the database's clock (read: list_nodes).
    age: timedelta = timedelta(0)


class Nodes(Protocol):
    async def heartbeat(self, node: NodeRecord) -> bool:
        """Upserts the node's row with the database's time; keeps its `draining`, and
        returns it."""

    async def list_nodes(self) -> list[NodeRecord]:
        """Every node, dead ones too (their heartbeat_time and age say so), by name."""

    async def set_draining(self, name: str, draining: bool) -> bool:
        """False when no such node has heartbeated."""

    async def node_address(self, name: str) -> str | None: ...


@dataclass(frozen=True)
class DrainProgress:
    draining: bool
    held: Mapping[State, int]  # its live sandboxes by state (warm pool members too)
    report: Mapping[str, Any]  # the node's own words (controller.sandboxes.moves)


@dataclass(frozen=True)
class DeadNode:
    """A node declared dead by a sweep, and what the sweep did to its sandboxes."""

    name: str
    last_seen: datetime
    terminated: int
    forgotten: int


# The states a dead node's sandbox is TERMINATED from: its process is gone with the node.
# DEPROVISIONING ones become tombstones (their caller asked for them gone); warm pool members'
# rows are forgotten. PAUSED ones stay: they hold no process, and their checkpoint, on that
# node's disk, resumes when it comes back (a pause survives a reboot).
_TERMINATED_FROM = (State.PROVISIONING, State.RUNNING)
# A dead node's sandboxes whose expire_time has come become tombstones (its reaper is not
# there to do it); if the node comes back, their containers are ones its registry does not
# know: removed.
_EXPIRED_FROM = (State.TERMINATED, State.PAUSED)


def _in(states: tuple[State, ...]) -> str:
    return f"state IN ({', '.join(str(int(state)) for state in states)})"


class PostgresNodes:
    """Nodes on the PostgreSQL registry's database: shares `registry`'s connections."""

    def __init__(self, registry: PostgresRegistry) -> None:
        self._registry = registry

    def __repr__(self) -> str:
        return f"<PostgresNodes {self._registry!r}>"

    async def heartbeat(self, node: NodeRecord) -> bool:
        async with self._registry.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO nodes (name, address, heartbeat_time, draining, sandboxes, "
                "max_sandboxes, free_memory, warm) VALUES (%s, %s, now(), false, %s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET address = excluded.address, "
                "heartbeat_time = excluded.heartbeat_time, sandboxes = excluded.sandboxes, "
                "max_sandboxes = excluded.max_sandboxes, free_memory = excluded.free_memory, "
                "warm = excluded.warm RETURNING draining",
                (
                    node.name,
                    node.address,
                    node.sandboxes,
                    node.max_sandboxes,
                    node.free_memory,
                    json.dumps(dict(node.warm), sort_keys=True),
                ),
            )
            row = await cursor.fetchone()
            return bool(row is not None and row[0])

    async def list_nodes(self) -> list[NodeRecord]:
        async with self._registry.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute("SELECT *, now() - heartbeat_time AS age FROM nodes ORDER BY name")
            return [_node(row) for row in await cursor.fetchall()]

    async def set_draining(self, name: str, draining: bool) -> bool:
        async with self._registry.connection() as conn:
            cursor = await conn.execute(
                "UPDATE nodes SET draining = %s WHERE name = %s", (draining, name)
            )
            return bool(cursor.rowcount == 1)

    async def report_drain(self, name: str, report: Mapping[str, Any]) -> None:
        """Writes what the node's drain has done so far (for `python -m controller drain`)."""
        async with self._registry.connection() as conn:
            await conn.execute(
                "UPDATE nodes SET drain_report = %s WHERE name = %s",
                (json.dumps(dict(report), sort_keys=True), name),
            )

    async def drain_progress(self, name: str) -> DrainProgress | None:
        """Whether the node is draining, how many sandboxes it still holds (by state), and
        its drain report; None when no such node has heartbeated."""
        async with self._registry.connection() as conn:
            cursor = await conn.execute(
                "SELECT draining, drain_report FROM nodes WHERE name = %s", (name,)
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            counted = await conn.execute(
                f"SELECT state, count(*) FROM sandboxes WHERE node = %s "
                f"AND state != {int(State.DELETED)} GROUP BY state",
                (name,),
            )
            held = {State(int(state)): int(count) for state, count in await counted.fetchall()}
        report = json.loads(row[1]) if row[1] else {}
        return DrainProgress(bool(row[0]), held, report if isinstance(report, dict) else {})

    async def node_address(self, name: str) -> str | None:
        async with self._registry.connection() as conn:
            cursor = await conn.execute("SELECT address FROM nodes WHERE name = %s", (name,))
            row = await cursor.fetchone()
            return None if row is None else str(row[0])

    # --- the sweep, under one lock across all nodes ---------------------------------------

    async def sweep_dead(
        self, timeout: timedelta, now: datetime, sweeper: str = ""
    ) -> list[DeadNode] | None:
        """Under the sweep lock: the PROVISIONING and RUNNING sandboxes of every node whose
        heartbeat is older than `timeout` are TERMINATED saying which node and since when
        (DEPROVISIONING ones become tombstones, warm pool members' rows are forgotten, PAUSED
        ones stay), and its TERMINATED and PAUSED ones whose expire_time has come (by `now`)
        tombstones; `now` is written as their update_time. `sweeper`, the node sweeping, is
        never dead to itself (its own heartbeat may be old for a write the database's outage
        held up). None when another node's sweep holds the lock (it does this)."""
        async with self._registry.connection() as conn, conn.transaction():
            if not await _take_sweep_lock(conn):
                return None
            cursor = await conn.execute(
                "SELECT name, heartbeat_time FROM nodes WHERE heartbeat_time < now() - %s "
                "AND name != %s ORDER BY name",
                (timeout, sweeper),
            )
            dead = []
            for name, last_seen in await cursor.fetchall():
                dead.append(await _give_up(conn, str(name), last_seen, now))
            return [node for node in dead if node.terminated or node.forgotten]

    async def purge_tombstones(self, deleted_before: datetime) -> int | None:
        """The registry's purge_tombstones under the sweep lock; None when another node's
        sweep holds it."""
        async with self._registry.connection() as conn, conn.transaction():
            if not await _take_sweep_lock(conn):
                return None
            cursor = await conn.execute(
                f"DELETE FROM sandboxes WHERE state = {int(State.DELETED)} AND delete_time < %s",
                (micros_since_epoch(deleted_before),),
            )
            return int(cursor.rowcount)


async def _take_sweep_lock(conn: "psycopg.AsyncConnection[Any]") -> bool:
    """Within a transaction: the sweep lock until its end, if no other session holds it."""
    cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (pg_schema.SWEEP_LOCK,))
    row = await cursor.fetchone()
    return bool(row is not None and row[0])


async def _give_up(
    conn: "psycopg.AsyncConnection[Any]", name: str, last_seen: datetime, now: datetime
) -> DeadNode:
    """Within the sweep's transaction: what a dead node held is given up."""
    seen = last_seen.isoformat(timespec="seconds")
    when = micros_since_epoch(now)
    forgotten = await conn.execute(
        f"DELETE FROM sandboxes WHERE node = %s AND {_in((State.WARMING, State.POOLED))}",
        (name,),
    )
    terminated = await conn.execute(
        f"UPDATE sandboxes SET state = {int(State.TERMINATED)}, state_message = %s, "
        f"update_time = %s WHERE node = %s AND {_in(_TERMINATED_FROM)}",
        (given_up_message(name, seen), when, name),
    )
    await conn.execute(
        f"UPDATE sandboxes SET state = {int(State.DELETED)}, delete_time = %s, "
        f"delete_reason = 'deleted', update_time = %s WHERE node = %s "
        f"AND state = {int(State.DEPROVISIONING)}",
        (when, when, name),
    )
    await conn.execute(
        f"UPDATE sandboxes SET state = {int(State.DELETED)}, delete_time = %s, "
        f"delete_reason = 'expired', update_time = %s WHERE node = %s "
        f"AND {_in(_EXPIRED_FROM)} AND expire_time <= %s",
        (when, when, name, when),
    )
    dead = DeadNode(name, last_seen, int(terminated.rowcount), int(forgotten.rowcount))
    if dead.terminated or dead.forgotten:
        log.warning(
            "a node stopped answering: its sandboxes are terminated",
            node=name,
            last_seen=seen,
            terminated=dead.terminated,
            forgotten=dead.forgotten,
        )
    return dead


def _node(row: Mapping[str, Any]) -> NodeRecord:
    return NodeRecord(
        name=row["name"],
        address=row["address"],
        heartbeat_time=row["heartbeat_time"],
        draining=bool(row["draining"]),
        sandboxes=int(row["sandboxes"]),
        max_sandboxes=int(row["max_sandboxes"]),
        free_memory=int(row["free_memory"]),
        warm={str(kind): int(count) for kind, count in json.loads(row["warm"]).items()},
        age=row["age"],
    )
