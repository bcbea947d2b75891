"""The registry's schema in PostgreSQL: numbered migrations, each applied in one transaction,
by one process at a time (an advisory lock), and recorded in schema_migrations.

A migration, once released, is never edited: a change of the table is a new one appended to
MIGRATIONS (tests check that the migrated table has every column of controller.store.table).
"""

from typing import Any

import psycopg
import structlog

log = structlog.get_logger()

# Advisory lock keys, constants of petri's own: the one-key form for migrating the schema and
# for the sweep, the two-key form (this class, a hash of the project) for adding a sandbox
# within its quota.
MIGRATION_LOCK = 0x70657472_69000001  # "petri" and a serial number
PROJECT_LOCK_CLASS = 0x70657472  # "petr"
# Held, for a transaction, by the one node sweeping dead nodes' sandboxes and old tombstones
# (controller.store.nodes).
SWEEP_LOCK = 0x70657472_69000002

# The table as SQLite's version 3 holds it; text compares bytewise (COLLATE "C"), as SQLite's
# does, so names sort the same on either and whatever the database's default collation is.
# Times are microseconds since the epoch (BIGINT); JSON is text, as controller.store.table
# encodes it. The conditions are controller.store.schema's LIVE and SHOWN of that version.
_V1 = (
    """CREATE TABLE sandboxes (
    uid TEXT COLLATE "C" PRIMARY KEY,
    project TEXT COLLATE "C" NOT NULL,
    sandbox_id TEXT COLLATE "C" NOT NULL,
    display_name TEXT NOT NULL,
    labels TEXT NOT NULL,
    spec TEXT NOT NULL,
    state INTEGER NOT NULL,
    state_message TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    expire_time BIGINT NOT NULL,
    last_active_time BIGINT NOT NULL,
    execution_count BIGINT NOT NULL,
    incarnation TEXT NOT NULL,
    request_id TEXT COLLATE "C",
    create_request TEXT,
    container_name TEXT NOT NULL,
    socket_dir TEXT NOT NULL,
    delete_time BIGINT,
    delete_reason TEXT NOT NULL,
    auto_pause_after BIGINT NOT NULL DEFAULT 0,
    checkpoint TEXT,
    restore_report TEXT
)""",
    "CREATE UNIQUE INDEX live_sandbox_names ON sandboxes (project, sandbox_id) WHERE state != 10",
    "CREATE UNIQUE INDEX request_ids ON sandboxes (project, request_id) "
    "WHERE request_id IS NOT NULL",
    "CREATE INDEX shown_by_project ON sandboxes (project, create_time, uid) "
    "WHERE state IN (1, 2, 3, 4, 5)",
    "CREATE INDEX live_by_expiry ON sandboxes (expire_time) WHERE state != 10",
    "CREATE INDEX running_by_activity ON sandboxes (last_active_time) WHERE state = 2",
)

# Version 2: the node holding each sandbox's container, when several controllers (role node)
# share the database; the per-host queries (controller.store.postgres) look at their own.
_V2 = (
    "ALTER TABLE sandboxes ADD COLUMN node TEXT COLLATE \"C\" NOT NULL DEFAULT ''",
    "CREATE INDEX live_by_node ON sandboxes (node, state) WHERE state != 10",
    # Each node's heartbeat (the database's time) and figures, for gateways and the sweep.
    """CREATE TABLE nodes (
    name TEXT COLLATE "C" PRIMARY KEY,
    address TEXT NOT NULL,
    heartbeat_time TIMESTAMPTZ NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT false,
    sandboxes INTEGER NOT NULL,
    max_sandboxes INTEGER NOT NULL,
    free_memory BIGINT NOT NULL,
    warm TEXT NOT NULL
)""",
)

# Version 3: moving a draining node's sandboxes (controller.store.moves). Each move under way
# names its sandbox, the two nodes and the hash of a one-time token that only the source and
# the target know; a node's drain report (what it moved, what failed and why) is for
# `python -m controller drain`.
_V3 = (
    """CREATE TABLE moves (
    uid TEXT COLLATE "C" PRIMARY KEY,
    source TEXT COLLATE "C" NOT NULL,
    target TEXT COLLATE "C" NOT NULL,
    token_hash TEXT NOT NULL,
    resume BOOLEAN NOT NULL,
    create_time TIMESTAMPTZ NOT NULL DEFAULT now()
)""",
    "ALTER TABLE nodes ADD COLUMN drain_report TEXT NOT NULL DEFAULT ''",
)

# MIGRATIONS[n - 1] brings the schema from version n - 1 to version n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)

_HISTORY = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


class DatabaseUnusable(RuntimeError):
    """The registry's database cannot be used (at start, or by the drain command): a person's
    to fix, said in one line."""


class SchemaTooNew(DatabaseUnusable):
    """The database was migrated by a newer controller: this one must not write to it."""


async def migrate(conn: "psycopg.AsyncConnection[Any]") -> int:
    """Brings the database to SCHEMA_VERSION, holding the migration lock meanwhile (another
    process opening it at once waits, then finds nothing left to do); returns how many
    migrations this call applied. SchemaTooNew, untouched, for a newer database. `conn` is in
    autocommit mode and holds the lock until it is closed: close it after."""
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    await conn.execute(_HISTORY)
    cursor = await conn.execute("SELECT max(version) FROM schema_migrations")
    row = await cursor.fetchone()
    current = int(row[0]) if row is not None and row[0] is not None else 0
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the registry's database has schema version {current}, newer than this "
            f"controller's {SCHEMA_VERSION}: upgrade the controller"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        async with conn.transaction():
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        log.info("registry schema migrated", version=version)
    return SCHEMA_VERSION - current
