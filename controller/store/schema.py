"""The registry's schema: its version, the conditions that say which rows are live or shown,
the indexes, and the migration of an older file in place."""

import sqlite3
from pathlib import Path

from controller.records import PUBLIC_STATES, State
from controller.store.table import BY_NAME, create_table_sql

# Version 1 marked a tombstone by its delete_time and a warm pool member by the project "";
# version 2 by its state (WARMING, POOLED, DELETED); version 3 added PAUSED (5, the public
# value: WARMING, POOLED and DELETED moved from 5, 6, 7 to 8, 9, 10), auto_pause_after,
# checkpoint and restore_report; version 4 node (the controller holding the container, when
# several share a registry).
SCHEMA_VERSION = 4

# Literal values, not parameters: SQLite uses a partial index only for a query whose WHERE
# contains the index's condition as written.
LIVE = f"state != {int(State.DELETED)}"  # not a tombstone
# What List and quotas see: no warm pool member, no tombstone.
SHOWN = f"state IN ({', '.join(str(int(state)) for state in PUBLIC_STATES)})"

_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS live_sandbox_names "
    f"ON sandboxes (project, sandbox_id) WHERE {LIVE}",
    "CREATE UNIQUE INDEX IF NOT EXISTS request_ids "
    "ON sandboxes (project, request_id) WHERE request_id IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS shown_by_project ON sandboxes (project, create_time, uid) "
    f"WHERE {SHOWN}",
    f"CREATE INDEX IF NOT EXISTS live_by_expiry ON sandboxes (expire_time) WHERE {LIVE}",
)
# Version 1's indexes whose conditions were `delete_time IS NULL`.
_V1_INDEXES = ("live_sandbox_names", "live_by_project", "live_by_expiry")
# Columns added while the schema was at version 1: a version-1 file may lack them.
_ADDED_IN_V1 = ("create_request",)
_ADDED_IN_V3 = ("auto_pause_after", "checkpoint", "restore_report")
_ADDED_IN_V4 = ("node",)
# Every index whose condition names states by value: made again after a renumbering.
_STATE_INDEXES = ("live_sandbox_names", "shown_by_project", "live_by_expiry")
# Version 2's values of the states that version 3 moved.
_V2_STATES = {5: State.WARMING, 6: State.POOLED, 7: State.DELETED}


def prepare(db: sqlite3.Connection, path: Path) -> None:
    """Creates the schema in a new file or brings an older one to this version, in one
    transaction: a failed migration leaves the file as it was."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"registry {path} has schema version {version}, newer than this "
                f"controller's {SCHEMA_VERSION}: upgrade the controller"
            )
        if version == 2:
            _renumber_v2_states(db)
        if version in (1, 2):
            _add_columns(db, _ADDED_IN_V3)
        if version in (1, 2, 3):
            _add_columns(db, _ADDED_IN_V4)
        if version == 1:
            _migrate_from_v1(db)
        db.execute(create_table_sql())
        for index in _INDEXES:
            db.execute(index)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _add_columns(db: sqlite3.Connection, names: tuple[str, ...]) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(sandboxes)")}
    for name in names:
        if name not in present:
            db.execute(f"ALTER TABLE sandboxes ADD COLUMN {name} {BY_NAME[name].sql_type}")


def _renumber_v2_states(db: sqlite3.Connection) -> None:
    """Version 2's WARMING, POOLED and DELETED values to version 3's, in one statement (no row
    passes through another's value), and the indexes that named them made again."""
    for index in _STATE_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS {index}")
    cases = " ".join(f"WHEN {old} THEN {int(new)}" for old, new in _V2_STATES.items())
    db.execute(f"UPDATE sandboxes SET state = CASE state {cases} ELSE state END")


def _migrate_from_v1(db: sqlite3.Connection) -> None:
    _add_columns(db, _ADDED_IN_V1)
    for index in _V1_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS {index}")
    db.execute(
        "UPDATE sandboxes SET state = ? WHERE delete_time IS NOT NULL", (int(State.DELETED),)
    )
    # Version 1's pool members: project "" (no project name is empty), not yet claimed. One
    # being discarded was DEPROVISIONING: as a member it is discarded at start, no tombstone.
    db.execute(
        "UPDATE sandboxes SET state = ? WHERE project = '' AND state = ?",
        (int(State.WARMING), int(State.PROVISIONING)),
    )
    db.execute(
        "UPDATE sandboxes SET state = ? WHERE project = '' AND state IN (?, ?, ?)",
        (int(State.POOLED), int(State.RUNNING), int(State.DEPROVISIONING), int(State.TERMINATED)),
    )
