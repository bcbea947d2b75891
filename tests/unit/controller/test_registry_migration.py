"""A registry file written by an older controller, opened by this one: migrated in place."""

import json
import re
import sqlite3
from pathlib import Path

import pytest

from controller.records import POOL_PROJECT, State
from controller.store.schema import SCHEMA_VERSION
from controller.store.sqlite import SqliteRegistry
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import PROFILE, fast_config, serving, short_runtime_dir

# Version 1's schema as that controller wrote it, verbatim: the file a user upgrades from.
V1_SCHEMA = """
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
T0 = 1_767_225_600_000_000  # 2026-01-01, in microseconds
SPEC = json.dumps(
    {
        "image_profile": "test",
        "runtime": "RUNC",
        "resources": {"cpu_millis": 0, "memory_bytes": 0, "disk_bytes": 0, "max_processes": 0},
    }
)


def v1_file(
    path: Path, rows: list[tuple[str, str, str, State | int, int | None]], schema: str
) -> None:
    """A version-1 registry holding rows of (uid, project, sandbox_id, state, delete_time)."""
    db = sqlite3.connect(path)
    db.executescript(schema)
    for uid, project, sandbox_id, state, delete_time in rows:
        db.execute(
            "INSERT INTO sandboxes (uid, project, sandbox_id, display_name, labels, spec, state, "
            "state_message, create_time, update_time, expire_time, last_active_time, "
            "execution_count, incarnation, request_id, container_name, socket_dir, "
            "delete_time, delete_reason) VALUES (?, ?, ?, '', '{}', ?, ?, '', ?, ?, ?, ?, 0, "
            "'', ?, ?, '', ?, ?)",
            (
                uid,
                project,
                sandbox_id,
                SPEC,
                int(state),
                T0,
                T0,
                T0 + 3_600_000_000,
                T0,
                f"req-{uid}",
                f"petri-{uid}",
                delete_time,
                "deleted" if delete_time else "",
            ),
        )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def states(path: Path) -> dict[str, State]:
    db = sqlite3.connect(path)
    found = {uid: State(state) for uid, state in db.execute("SELECT uid, state FROM sandboxes")}
    db.close()
    return found


async def test_a_version_1_registry_keeps_its_sandboxes_as_states(tmp_path: Path) -> None:
    path = tmp_path / "petri.db"
    v1_file(
        path,
        [
            ("u-old-a", "p", "a", State.DEPROVISIONING, T0 + 5),  # a tombstone...
            ("u-a", "p", "a", State.RUNNING, None),  # ...and the sandbox now named a
            ("u-dead", "p", "dead", State.TERMINATED, None),
            ("u-warming", POOL_PROJECT, "u-warming", State.PROVISIONING, None),
            ("u-pooled", POOL_PROJECT, "u-pooled", State.RUNNING, None),
            ("u-pool-gone", POOL_PROJECT, "u-pool-gone", State.RUNNING, T0),
            # A member whose discard a stopping version-1 controller left half-way.
            ("u-pool-going", POOL_PROJECT, "u-pool-going", State.DEPROVISIONING, None),
        ],
        V1_SCHEMA,
    )
    registry = SqliteRegistry(path)
    await registry.open()
    try:
        live = await registry.get_live("p", "a")
        assert live is not None and live.uid == "u-a" and live.state is State.RUNNING
        tombstone = await registry.get_latest_tombstone("p", "a")
        assert tombstone is not None and tombstone.uid == "u-old-a"
        assert tombstone.delete_reason == "deleted"
        assert await registry.count_live("p") == 2
        assert {r.uid for r in await registry.list_live()} == {
            "u-a",
            "u-dead",
            "u-warming",
            "u-pooled",
            "u-pool-going",
        }
        assert await registry.claim_pool_member("u-pooled", project="p", sandbox_id="mine")
        assert not await registry.claim_pool_member("u-warming", project="p", sandbox_id="x")
        found = await registry.get_by_request_id("p", "req-u-old-a")
        assert found is not None and found.state is State.DELETED
    finally:
        await registry.close()
    assert states(path) == {
        "u-old-a": State.DELETED,
        "u-a": State.RUNNING,
        "u-dead": State.TERMINATED,
        "u-warming": State.WARMING,
        "u-pooled": State.RUNNING,  # claimed above
        "u-pool-gone": State.DELETED,
        "u-pool-going": State.POOLED,  # a member still: discarded at start, no tombstone
    }

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[1] for row in db.execute("PRAGMA index_list(sandboxes)")}
    db.close()
    assert "live_by_project" not in indexes
    assert {"live_sandbox_names", "request_ids", "shown_by_project", "live_by_expiry"} <= indexes

    reopened = SqliteRegistry(path)  # a migrated file opens as it is
    await reopened.open()
    assert await reopened.count_live("p") == 3
    await reopened.close()


async def test_a_version_1_registry_without_create_request_gains_the_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "petri.db"
    older = re.sub(r"\n +create_request .*", "", V1_SCHEMA)
    assert older != V1_SCHEMA
    v1_file(path, [("u-a", "p", "a", State.RUNNING, None)], older)
    registry = SqliteRegistry(path)
    await registry.open()
    try:
        assert await registry.set_fields("u-a", create_request='{"x": 1}')
        found = await registry.get_by_request_id("p", "req-u-a")
        assert found is not None and found.create_request == '{"x": 1}'
    finally:
        await registry.close()


async def test_a_registry_newer_than_the_controller_is_refused_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "petri.db"
    v1_file(path, [("u-a", "p", "a", State.RUNNING, None)], V1_SCHEMA)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    registry = SqliteRegistry(path)
    with pytest.raises(
        RuntimeError,
        match=f"schema version {SCHEMA_VERSION + 1}, newer than this controller's {SCHEMA_VERSION}",
    ):
        await registry.open()
    await registry.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()
    assert states(path) == {"u-a": State.RUNNING}


async def test_a_version_1_pool_member_left_mid_discard_leaves_no_tombstone(
    tmp_path: Path,
) -> None:
    # Version 1 marked a member being discarded DEPROVISIONING (project "") and forgot its row
    # at the next start; it must not become a tombstone of nobody's sandbox.
    with short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir)
        config.state_dir.mkdir(parents=True)
        v1_file(
            config.database_path,
            [
                ("u-going", POOL_PROJECT, "u-going", State.DEPROVISIONING, None),
                ("u-mine", "p", "mine", State.DEPROVISIONING, None),
            ],
            V1_SCHEMA,
        )
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime):
                pass
        finally:
            await runtime.shutdown()
        # The caller's sandbox deleted half-way is finished into a tombstone; the member is gone.
        assert states(config.database_path) == {"u-mine": State.DELETED}


# Version 2: version 1's table, its states WARMING, POOLED and DELETED as 5, 6 and 7, and
# indexes whose conditions name those values.
V2_SCHEMA = (
    V1_SCHEMA.split("CREATE UNIQUE INDEX")[0]
    + """
CREATE UNIQUE INDEX IF NOT EXISTS live_sandbox_names
    ON sandboxes (project, sandbox_id) WHERE state != 7;
CREATE UNIQUE INDEX IF NOT EXISTS request_ids
    ON sandboxes (project, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS shown_by_project
    ON sandboxes (project, create_time, uid) WHERE state IN (1, 2, 3, 4);
CREATE INDEX IF NOT EXISTS live_by_expiry ON sandboxes (expire_time) WHERE state != 7;
"""
)


async def test_a_version_2_registry_moves_its_own_states_out_of_paused_s_way(
    tmp_path: Path,
) -> None:
    """Version 3 gave PAUSED its public value, 5, which version 2 used for WARMING: every
    state keeps its meaning, a tombstone stays one (its name free for a new sandbox), and the
    new columns read as "never pauses on its own, no checkpoint"."""
    path = tmp_path / "petri.db"
    v1_file(
        path,
        [
            ("u-run", "p", "a", State.RUNNING, None),
            ("u-warming", POOL_PROJECT, "u-warming", 5, None),
            ("u-pooled", POOL_PROJECT, "u-pooled", 6, None),
            ("u-gone", "p", "b", 7, T0),
        ],
        V2_SCHEMA,
    )
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    registry = SqliteRegistry(path)
    await registry.open()
    try:
        assert {r.uid: r.state for r in await registry.list_live()} == {
            "u-run": State.RUNNING,
            "u-warming": State.WARMING,
            "u-pooled": State.POOLED,
        }
        tombstone = await registry.get_latest_tombstone("p", "b")
        assert tombstone is not None and tombstone.state is State.DELETED
        live = await registry.get_live("p", "a")
        assert live is not None and live.checkpoint is None and not live.auto_pause_after
        assert await registry.count_live("p") == 1
    finally:
        await registry.close()
    assert states(path)["u-gone"] is State.DELETED
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
