"""Nodes sharing one registry in a real PostgreSQL (role node): each node's per-host queries
see its own rows, while names, quotas, Get and List span them all; heartbeats and draining;
a dead node's sandboxes terminated by one sweeper at a time; the schema's node column."""

import asyncio
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, Mock

import grpc
import psycopg
import pytest

from controller.__main__ import drain
from controller.app import NodeMembership, start_controller
from controller.clock import utcnow
from controller.config import Config, load_config
from controller.errors import AlreadyExists, Unavailable
from controller.records import POOL_PROJECT, CheckpointInfo, State, given_up_message
from controller.sandboxes.reaper import TtlReaper
from controller.store import pg_schema, table
from controller.store.nodes import NodeRecord, PostgresNodes
from controller.store.postgres import PostgresRegistry
from controller.store.schema import SCHEMA_VERSION
from controller.store.sqlite import SqliteRegistry
from controller.store.table import NAMES
from petri.v1 import sandbox_pb2
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import (
    PROFILE,
    PROJECT,
    REPOSITORY,
    eventually,
    expect,
    fast_config,
    serving,
    short_runtime_dir,
)
from tests.unit.controller.test_registry import T0, query, record

LATER = T0 + timedelta(days=1)
LATER_STILL = LATER + timedelta(hours=1)
HELD: dict[str, Any] = {}


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[tuple[PostgresRegistry, PostgresRegistry]]:
    """The registries of nodes n1 and n2 on one database."""
    n1, n2 = PostgresRegistry(pg_url, node="n1"), PostgresRegistry(pg_url, node="n2")
    await n1.open()
    await n2.open()
    yield n1, n2
    await n1.close()
    await n2.close()


def heartbeat_of(name: str, **changes: Any) -> NodeRecord:
    values: dict[str, Any] = {
        "name": name,
        "address": f"{name}.example:50051",
        "heartbeat_time": utcnow(),
        "draining": False,
        "sandboxes": 3,
        "max_sandboxes": 10,
        "free_memory": 1 << 30,
        "warm": {"full/runc": 2},
        **changes,
    }
    return NodeRecord(**values)


async def make_dead(pg_url: str, name: str) -> None:
    """The node's last heartbeat a minute ago."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE nodes SET heartbeat_time = now() - interval '1 minute' WHERE name = %s",
            (name,),
        )


async def test_each_node_s_per_host_queries_see_its_own_rows_only(
    nodes: tuple[PostgresRegistry, PostgresRegistry],
) -> None:
    n1, n2 = nodes
    for registry, name in ((n1, "a"), (n2, "b")):
        saved = CheckpointInfo(create_time=T0 - timedelta(minutes=1), size_bytes=1)
        await registry.insert(
            record(name, expire_time=T0, auto_pause_after=timedelta(seconds=1), checkpoint=saved)
        )
        await registry.insert(record(f"{name}-pool", project=POOL_PROJECT, state=State.POOLED))
    assert {r.uid for r in await n1.list_live()} == {"uid-a", "uid-a-pool"}
    assert {r.uid for r in await n2.list_live()} == {"uid-b", "uid-b-pool"}
    assert [r.uid for r in await n1.list_expired(LATER, 10)] == ["uid-a", "uid-a-pool"]
    assert [r.uid for r in await n2.list_auto_pause_due(LATER, 10, HELD)] == ["uid-b"]
    assert [r.uid for r in await n1.list_unsaved_idle(LATER, 10, HELD)] == ["uid-a"]
    assert await n2.count_by_state() == {State.RUNNING: 1, State.POOLED: 1}
    # What every node sees alike: names, quotas, Get, List.
    for registry in (n1, n2):
        assert [r.sandbox_id for r in await registry.list_page(query())] == ["a", "b"]
        assert await registry.count_live("p") == 2
        found = await registry.get_live("p", "a")
        assert found is not None and found.node == "n1"
    with pytest.raises(AlreadyExists):
        await n2.insert(record("a", uid="uid-a-again"))


async def test_a_node_s_inserts_and_claims_say_its_name(
    nodes: tuple[PostgresRegistry, PostgresRegistry],
) -> None:
    n1, n2 = nodes
    await n1.insert(record("a", node="someone-else"))  # the registry's node, not the caller's
    await n2.insert(record("m", project=POOL_PROJECT, state=State.POOLED))
    assert await n2.claim_pool_member("uid-m", project="p", sandbox_id="claimed")
    a, claimed = await n1.get_live("p", "a"), await n1.get_live("p", "claimed")
    assert a is not None and a.node == "n1"
    assert claimed is not None and claimed.node == "n2"


async def test_heartbeats_and_draining_round_trip(
    nodes: tuple[PostgresRegistry, PostgresRegistry],
) -> None:
    n1, n2 = nodes
    first, second = PostgresNodes(n1), PostgresNodes(n2)
    assert await first.list_nodes() == []
    assert not await first.set_draining("n2", True)  # not heartbeated yet
    await first.heartbeat(heartbeat_of("n1"))
    await second.heartbeat(heartbeat_of("n2", sandboxes=1))
    assert await first.set_draining("n2", True)
    await second.heartbeat(heartbeat_of("n2", sandboxes=2, warm={}))  # keeps `draining`
    listed = await first.list_nodes()
    assert [(n.name, n.draining, n.sandboxes, dict(n.warm)) for n in listed] == [
        ("n1", False, 3, {"full/runc": 2}),
        ("n2", True, 2, {}),
    ]
    assert all(timedelta(0) <= n.age < timedelta(seconds=5) for n in listed)
    assert listed[0].max_sandboxes == 10 and listed[0].free_memory == 1 << 30
    assert listed[0].heartbeat_time.tzinfo is not None
    assert await second.node_address("n1") == "n1.example:50051"
    assert await second.node_address("n3") is None
    assert await second.set_draining("n2", False)
    assert not [n for n in await first.list_nodes() if n.draining]


async def test_a_dead_node_s_sandboxes_are_terminated_saying_which_node_and_when(
    pg_url: str, nodes: tuple[PostgresRegistry, PostgresRegistry]
) -> None:
    n1, n2 = nodes
    await n1.insert(record("mine", expire_time=LATER_STILL))
    await n2.insert(record("running", expire_time=LATER_STILL))
    await n2.insert(record("paused", state=State.PAUSED, expire_time=LATER_STILL))
    await n2.insert(record("going", state=State.DEPROVISIONING, expire_time=LATER_STILL))
    await n2.insert(record("m", project=POOL_PROJECT, state=State.POOLED, expire_time=LATER_STILL))
    await n2.insert(record("expired", state=State.TERMINATED))  # its node would reap it
    await n2.insert(record("paused-expired", state=State.PAUSED))
    first, second = PostgresNodes(n1), PostgresNodes(n2)
    await first.heartbeat(heartbeat_of("n1"))
    await second.heartbeat(heartbeat_of("n2"))
    assert await first.sweep_dead(timedelta(seconds=10), LATER) == []  # both alive
    await make_dead(pg_url, "n2")
    swept = await first.sweep_dead(timedelta(seconds=10), LATER)
    assert swept is not None and [(d.name, d.terminated, d.forgotten) for d in swept] == [
        ("n2", 1, 1)
    ]
    seen = swept[0].last_seen.isoformat(timespec="seconds")
    message = f"node n2 stopped answering at {seen}; its sandbox's process is gone"
    found = await n1.get_live("p", "running")
    assert found is not None
    assert (found.state, found.state_message, found.update_time) == (
        State.TERMINATED,
        message,
        LATER,
    )
    assert found.given_up
    # A paused one holds no process: its checkpoint resumes on its node once back.
    paused = await n1.get_live("p", "paused")
    assert paused is not None and paused.state is State.PAUSED and not paused.given_up
    assert await n1.get_live("p", "going") is None
    gone = await n1.get_latest_tombstone("p", "going")
    assert gone is not None and gone.delete_reason == "deleted"
    for name in ("expired", "paused-expired"):
        expired = await n1.get_latest_tombstone("p", name)
        assert expired is not None
        assert (expired.delete_reason, expired.delete_time) == ("expired", LATER)
    assert {r.uid for r in await n2.list_live()} == {"uid-running", "uid-paused"}  # no pool row
    mine = await n1.get_live("p", "mine")
    assert mine is not None and mine.state is State.RUNNING and not mine.given_up
    assert await first.sweep_dead(timedelta(seconds=10), LATER) == []  # nothing left to do
    # The sweeping node is never dead to itself, whatever its heartbeat's age.
    await make_dead(pg_url, "n1")
    assert await first.sweep_dead(timedelta(seconds=10), LATER, "n1") == []
    mine = await n1.get_live("p", "mine")
    assert mine is not None and mine.state is State.RUNNING


async def test_one_sweeper_at_a_time_across_nodes(
    pg_url: str, nodes: tuple[PostgresRegistry, PostgresRegistry]
) -> None:
    n1, n2 = nodes
    first, second = PostgresNodes(n1), PostgresNodes(n2)
    await second.heartbeat(heartbeat_of("n2"))
    await n2.insert(record("a"))
    await n2.insert(record("old", state=State.DELETED, delete_time=T0, delete_reason="deleted"))
    await make_dead(pg_url, "n2")
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as holder:
        # Another node's sweep under way: this one skips its round, touching nothing.
        await holder.execute("SELECT pg_advisory_lock(%s)", (pg_schema.SWEEP_LOCK,))
        assert await first.sweep_dead(timedelta(seconds=10), LATER) is None
        assert await first.purge_tombstones(LATER) is None
        a = await n1.get_live("p", "a")
        assert a is not None and a.state is State.RUNNING
        assert await n1.get_latest_tombstone("p", "old") is not None
        await holder.execute("SELECT pg_advisory_unlock(%s)", (pg_schema.SWEEP_LOCK,))
    # Two at once: each sandbox is terminated once, by whichever took the lock.
    results = await asyncio.gather(
        *(sweeper.sweep_dead(timedelta(seconds=10), LATER) for sweeper in (first, second))
    )
    assert sum(d.terminated for result in results for d in result or []) == 1
    assert await first.purge_tombstones(LATER) == 1
    assert await second.purge_tombstones(LATER) == 0


async def test_a_version_1_database_gains_the_node_column_and_keeps_its_rows(
    pg_url: str,
) -> None:
    version_1 = [name for name in NAMES if name != "node"]
    row = table.to_row(record("a"))
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(pg_schema._HISTORY)
        for statement in pg_schema.MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_migrations (version) VALUES (1)")
        await conn.execute(
            f"INSERT INTO sandboxes ({', '.join(version_1)}) "
            f"VALUES ({', '.join(f'%({name})s' for name in version_1)})",
            row,
        )
    node = PostgresRegistry(pg_url, node="n1")
    await node.open()
    found = await node.get_live("p", "a")
    assert found is not None and found.node == ""
    assert await node.list_live() == []  # not this node's
    await node.close()


async def test_an_older_sqlite_registry_gains_the_node_column(tmp_path: Path) -> None:
    path = tmp_path / "petri.db"
    registry = SqliteRegistry(path)
    await registry.open()
    await registry.insert(record("a"))
    await registry.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE sandboxes DROP COLUMN node")  # as version 3 made it
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    registry = SqliteRegistry(path)
    await registry.open()
    found = await registry.get_live("p", "a")
    assert found is not None and found.node == ""
    await registry.insert(record("b"))
    assert {r.uid for r in await registry.list_live()} == {"uid-a", "uid-b"}
    await registry.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert "node" in {row[1] for row in db.execute("PRAGMA table_info(sandboxes)")}
    db.close()


# --- configuration ----------------------------------------------------------------------


def test_node_and_gateway_roles_need_a_postgresql_registry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for role in ("node", "gateway"):
        with pytest.raises(SystemExit):
            load_config(["--role", role], environ={})
        assert f"role {role} needs the shared registry in PostgreSQL" in capsys.readouterr().err
    config = load_config(
        ["--role", "node", "--node-name", "web-1"],
        environ={"PETRI_DATABASE_URL": "postgresql:///petri"},
    )
    assert (config.role, config.node_name, config.advertised_address) == (
        "node",
        "web-1",
        config.listen,
    )
    assert load_config([], environ={}).role == "single"


@pytest.mark.parametrize(
    "name",
    [
        "Web",
        "-web",
        "web-",
        "we_b",
        ".".join(["a" * 63] * 4),
        "",
        "web 1",
        "web..1",
        ".web",
        "web.",
    ],
)
def test_a_node_name_is_a_dns_name(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config([f"--node-name={name}"], environ={})
    assert "is not a node name" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ip-10-0-0-1.ec2.internal", "web-01", "a" * 63, "n1.b.c"])
def test_kubernetes_node_names_are_node_names(name: str) -> None:
    """The manifests pass spec.nodeName, a DNS subdomain with dots on most clouds."""
    assert load_config([f"--node-name={name}"], environ={}).node_name == name


def test_a_node_is_named_after_its_host_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Web_01.example.com")
    assert load_config([], environ={}).node_name == "web-01"
    environ = {"PETRI_NODE_ADDRESS": "10.0.0.5:50051", "PETRI_MAX_SANDBOXES_PER_NODE": "40"}
    config = load_config([], environ=environ)
    assert (config.advertised_address, config.max_sandboxes_per_node) == ("10.0.0.5:50051", 40)


def test_a_node_timeout_must_exceed_the_heartbeat_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_config(["--heartbeat-interval", "5s", "--node-timeout", "5s"], environ={})
    assert "node_timeout must exceed heartbeat_interval" in capsys.readouterr().err


# --- two nodes, in process, on one (fake) podman ---------------------------------------


def node_config(tmp_path: Path, pg_url: str, name: str, runtime_dir: Path) -> Config:
    return fast_config(
        tmp_path / name,
        runtime_dir,
        database_url=pg_url,
        role="node",
        node_name=name,
        heartbeat_interval=timedelta(milliseconds=100),
        node_timeout=timedelta(seconds=1),
        reap_interval=timedelta(milliseconds=100),
        keep_running_on_shutdown=True,
    )


async def test_two_nodes_share_the_registry_and_one_terminates_the_dead_one_s_sandboxes(
    tmp_path: Path, pg_url: str
) -> None:
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})  # one podman, as on one host
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            config_a = node_config(tmp_path, pg_url, "a", dir_a)
            config_b = node_config(tmp_path, pg_url, "b", dir_b)
            async with serving(config_a, runtime) as a:
                created = await a.create("s1")
                assert await runtime.list_managed(a.controller.manager.registry_label)
                async with serving(config_b, runtime) as b:
                    # B's start adopted nothing of A's: its sandbox runs on, and B lists it.
                    assert runtime.container_of(a.runtime.uids().pop()) is not None
                    assert (await b.get(created.name)).state == sandbox_pb2.Sandbox.RUNNING
                    assert await b.names() == [created.name]
                    registry = b.controller.registry
                    assert isinstance(registry, PostgresRegistry)

                    async def figures() -> list[NodeRecord] | None:
                        listed = await PostgresNodes(registry).list_nodes()
                        counts = {n.name: n.sandboxes for n in listed}
                        return listed if counts == {"a": 1, "b": 0} else None

                    listed = await eventually(figures, "both nodes' heartbeats, with A's sandbox")
                    assert listed[0].address == f"127.0.0.1:{a.controller.port}"
                    # What needs its container goes through its own node only.
                    for call in (b.execute(created.name, "1"), b.delete(created.name)):
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            await call
                        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                        assert "is held by node a, not this one (b)" in str(refused.value.details())
                    a.controller.reaper.stop()  # A stops heartbeating: dead to B

                    async def terminated() -> sandbox_pb2.Sandbox | None:
                        sandbox = await b.get(created.name)
                        return sandbox if sandbox.state == sandbox_pb2.Sandbox.TERMINATED else None

                    sandbox = await eventually(terminated, "B to terminate A's sandbox")
                    assert sandbox.state_message.startswith("node a stopped answering at ")
            assert runtime.container_of(created.uid) is not None  # A stopped, leaving it
            # A comes back (its name the same, its state directory moved): what was given up
            # goes.
            moved = replace(config_a, state_dir=tmp_path / "a-moved")
            async with serving(moved, runtime) as a:
                assert runtime.container_of(created.uid) is None
                assert (await a.get(created.name)).state == sandbox_pb2.Sandbox.TERMINATED
                async with serving(config_b, runtime) as b:  # given up: any node ends it
                    await b.delete(created.name)
                    assert await b.names() == []
    finally:
        await runtime.shutdown()


async def test_a_second_process_under_a_live_node_s_name_refuses_to_start(
    tmp_path: Path, pg_url: str
) -> None:
    # An operator who copies one host's node.env to the next: two processes of one name would
    # adopt, discard and terminate each other's sandboxes (and heartbeat two addresses in turn).
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_twin:
            config_a = node_config(tmp_path, pg_url, "a", dir_a)
            twin = node_config(tmp_path / "twin", pg_url, "a", dir_twin)
            async with serving(config_a, runtime) as a:
                created = await a.create("s1")
                registry = a.controller.registry
                assert isinstance(registry, PostgresRegistry)

                async def beating() -> bool | None:
                    return any(n.name == "a" for n in await PostgresNodes(registry).list_nodes())

                await eventually(beating, "A's first heartbeat")
                with pytest.raises(ValueError, match="another process is running as node 'a'"):
                    stray = await start_controller(twin, runtime)
                    await stray.stop(0)  # started: the test fails, leaving nothing running
                assert (await a.get(created.name)).state == sandbox_pb2.Sandbox.RUNNING
                assert runtime.container_of(created.uid) is not None
    finally:
        await runtime.shutdown()


# --- the operator's drain command, and the reaper's share ------------------------------


def test_drain_marks_a_node_draining_and_undo_clears_it(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {"PETRI_DATABASE_URL": pg_url}
    assert drain(["n1"], environ) == 1  # it has never heartbeated
    assert "no node named 'n1' has heartbeated" in capsys.readouterr().err

    async def beat() -> None:
        registry = PostgresRegistry(pg_url, node="n1")
        await registry.open()
        await PostgresNodes(registry).heartbeat(heartbeat_of("n1"))
        await registry.close()

    asyncio.run(beat())

    def draining() -> bool:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT draining FROM nodes WHERE name = 'n1'").fetchone()
            return bool(row and row[0])

    assert drain(["n1", "--no-wait"], environ) == 0 and draining()
    assert capsys.readouterr().out == "node n1: draining\n"
    # Waiting: n1 holds nothing to move (a TERMINATED sandbox stays until deleted).
    registry = PostgresRegistry(pg_url, node="n1")

    async def terminated() -> None:
        await registry.open()
        await registry.insert(record("t", state=State.TERMINATED))
        await registry.close()

    asyncio.run(terminated())
    assert drain(["n1"], environ) == 0 and draining()
    assert capsys.readouterr().out.splitlines() == [
        "node n1: draining",
        "node n1: 0 left to move, 0 moved",
        "node n1: 1 TERMINATED sandboxes stay until deleted",
        "node n1: drained",
    ]
    assert drain(["n1", "--undo"], environ) == 0 and not draining()
    with pytest.raises(SystemExit):
        drain(["n1"], {})
    assert "set PETRI_DATABASE_URL or --database-url" in capsys.readouterr().err


async def test_a_waiting_drain_reports_what_the_node_says_and_ends_when_undone(
    pg_url: str,
) -> None:
    registry = PostgresRegistry(pg_url, node="n1")
    await registry.open()
    nodes = PostgresNodes(registry)
    await nodes.heartbeat(heartbeat_of("n1"))
    await registry.insert(record("r", state=State.RUNNING))  # no node process moves it
    # A reason may quote the sandbox's executor: no escape reaches the terminal as one.
    why = "no room \x1b[2J"
    report = {"moved": 2, "left": 1, "failed": {"projects/p/sandboxes/r": why}}
    await nodes.report_drain("n1", report)
    environ = {"PETRI_DATABASE_URL": pg_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "drain", "n1", env={**os.environ, **environ},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    lines = [(await process.stdout.readline()).decode() for _ in range(3)]
    assert lines == [
        "node n1: draining\n",
        "node n1: 1 left to move, 2 moved\n",
        "  not moved yet: projects/p/sandboxes/r: no room \\x1b[2J\n",
    ]
    assert await nodes.set_draining("n1", False)
    rest, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert rest.decode() == "node n1: the drain was undone before it was empty\n"
    await registry.close()


class _Membership:
    heartbeat_interval = timedelta(seconds=1)

    def __init__(self) -> None:
        self.purged: list[Any] = []

    async def heartbeat(self) -> None: ...

    async def sweep_dead(self) -> None: ...

    async def purge_tombstones(self, deleted_before: Any) -> int | None:
        self.purged.append(deleted_before)
        return None


async def test_a_node_s_reaper_purges_tombstones_only_under_the_sweep_lock(
    pg_url: str,
) -> None:
    registry = PostgresRegistry(pg_url, node="n1")
    await registry.open()
    await registry.insert(record("old", state=State.DELETED, delete_time=T0, delete_reason="x"))
    membership = _Membership()
    reaper = TtlReaper(
        Mock(), registry, timedelta(seconds=1), timedelta(0), lambda: LATER, membership=membership
    )
    await reaper.purge_tombstones()
    assert membership.purged == [LATER]
    assert await registry.get_latest_tombstone("p", "old") is not None  # not by the registry
    await registry.close()


async def test_a_running_node_removes_the_containers_of_sandboxes_given_up(
    tmp_path: Path, pg_url: str
) -> None:
    # Its heartbeats did not reach the database for a while: another node gave up its sandbox.
    with short_runtime_dir() as runtime_dir:
        config = node_config(tmp_path, pg_url, "a", runtime_dir)
        runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
        try:
            async with serving(config, runtime) as a:
                created, kept = await a.create("s1"), await a.create("s2")
                async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
                    await c.execute(
                        "UPDATE sandboxes SET state = 4, state_message = %s WHERE uid = %s",
                        (given_up_message("a", "2026-01-01T00:00:00+00:00"), created.uid),
                    )
                await a.controller.manager.check_containers()
                assert runtime.container_of(created.uid) is None
                assert runtime.container_of(kept.uid) is not None
        finally:
            await runtime.shutdown()


async def test_a_node_restarted_under_another_name_refuses_to_start(
    tmp_path: Path, pg_url: str
) -> None:
    # Its sandboxes' containers, labelled with the old name, ran on with no node to end them.
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    try:
        with short_runtime_dir() as runtime_dir:
            config = node_config(tmp_path, pg_url, "a", runtime_dir)
            async with serving(config, runtime) as a:
                created = await a.create("s1")
            renamed = replace(config, node_name="b")
            with pytest.raises(ValueError, match=r"this host's node is 'a' .*, not 'b'"):
                stray = await start_controller(renamed, runtime)
                await stray.stop(0)  # started: the test fails, leaving nothing running
            assert runtime.container_of(created.uid) is not None
            registry = PostgresRegistry(pg_url)
            await registry.open()
            found = await registry.get_live(PROJECT, "s1")
            await registry.close()
            assert found is not None and found.state is State.RUNNING and found.node == "a"
    finally:
        await runtime.shutdown()


async def test_a_row_left_provisioning_by_a_start_that_ended_is_discarded_at_the_second_check(
    tmp_path: Path, pg_url: str
) -> None:
    # The database was out of reach when the start ended (it could not be told RUNNING, nor
    # the row forgotten): the row held a quota place and its request_id's retries for ever.
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    try:
        with short_runtime_dir() as runtime_dir:
            config = node_config(tmp_path, pg_url, "a", runtime_dir)
            async with serving(config, runtime) as a:
                stuck, kept = await a.create("s1"), await a.create("s2")
                async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
                    await c.execute("UPDATE sandboxes SET state = 1 WHERE uid = %s", (stuck.uid,))
                await a.controller.manager.check_containers()  # a start may be just beginning
                assert (await a.get(stuck.name)).state == sandbox_pb2.Sandbox.PROVISIONING
                await a.controller.manager.check_containers()
                await expect(a.get(stuck.name), grpc.StatusCode.NOT_FOUND, "does not exist")
                assert runtime.container_of(stuck.uid) is None
                assert runtime.container_of(kept.uid) is not None
    finally:
        await runtime.shutdown()


class _Nodes:
    """PostgresNodes' heartbeat and sweep, counted; its heartbeats fail while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.sweeps = 0

    async def heartbeat(self, node: NodeRecord) -> None:
        if self.down:
            raise Unavailable("the registry's database is not answering")

    async def sweep_dead(self, timeout: timedelta, now: Any, sweeper: str = "") -> list[Any]:
        assert sweeper == "n1"
        self.sweeps += 1
        return []


async def test_a_node_sweeps_only_after_heartbeating_for_a_whole_node_timeout() -> None:
    # After the database was out of reach, every node's heartbeat is old: the others get a
    # node timeout to heartbeat again before anyone judges them.
    now = [0.0]
    nodes = _Nodes()
    registry = Mock(count_by_state=AsyncMock(return_value={State.RUNNING: 2}))
    config = Config(role="node", node_name="n1", node_timeout=timedelta(seconds=10))
    membership = NodeMembership(
        config,
        nodes,  # type: ignore[arg-type]
        registry,
        list,
        "n1:1",
        monotonic=lambda: now[0],
    )

    async def sweeps_at(when: float) -> int:
        now[0] = when
        await membership.sweep_dead()
        return nodes.sweeps

    assert await sweeps_at(0) == 0  # never heartbeated
    await membership.heartbeat()
    assert await sweeps_at(9.9) == 0
    assert await sweeps_at(10) == 1
    nodes.down = True
    with pytest.raises(Unavailable):
        await membership.heartbeat()
    assert await sweeps_at(30) == 1
    nodes.down = False
    await membership.heartbeat()
    assert await sweeps_at(39.9) == 1
    assert await sweeps_at(40) == 2
    # A heartbeat that succeeds, but late (it waited for a database killed and restarted, or
    # this process was stopped): the same as a failure, not a whole node timeout of beats.
    for beat in range(40, 52, 2):  # every heartbeat_interval (2 s)
        now[0] = beat
        await membership.heartbeat()
    assert await sweeps_at(50) == 3
    now[0] = 59.5  # 9.5 s after the one before
    await membership.heartbeat()
    assert await sweeps_at(69.4) == 3
    assert await sweeps_at(69.5) == 4


async def test_a_stopping_node_heartbeats_until_its_sandboxes_are_paused(
    tmp_path: Path, pg_url: str
) -> None:
    # Pausing every sandbox at shutdown may take minutes: meanwhile it is not dead.
    beats_while_pausing: list[datetime] = []
    with short_runtime_dir() as runtime_dir:
        config = replace(
            node_config(tmp_path, pg_url, "a", runtime_dir), keep_running_on_shutdown=False
        )
        runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
        try:
            async with serving(config, runtime) as a:
                registry = a.controller.registry
                assert isinstance(registry, PostgresRegistry)
                nodes = PostgresNodes(registry)

                async def slow_pause_all(within: float) -> None:
                    deadline = asyncio.get_running_loop().time() + 3
                    while len(set(beats_while_pausing)) < 3:
                        assert asyncio.get_running_loop().time() < deadline, beats_while_pausing
                        beats_while_pausing.extend(
                            n.heartbeat_time for n in await nodes.list_nodes()
                        )
                        await asyncio.sleep(0.05)

                a.controller.manager.pause_all = slow_pause_all  # type: ignore[method-assign]
        finally:
            await runtime.shutdown()
    assert len(set(beats_while_pausing)) >= 3
