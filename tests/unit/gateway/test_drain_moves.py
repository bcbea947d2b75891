"""A drain's move that fails, in the fast tier (two real nodes on a fake podman and stand-in
executors, a real PostgreSQL): the target does not take the sandbox over, so it stays whole on
its node, RUNNING again, and the drain report says why; no move is left in the registry."""

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from controller.records import State
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry
from petri.v1 import sandbox_pb2
from tests.postgres import fresh_database
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import (
    PROFILE,
    PROJECT,
    REPOSITORY,
    eventually,
    serving,
    short_runtime_dir,
)
from tests.unit.controller.test_nodes import node_config


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


async def test_a_move_the_target_does_not_take_leaves_the_sandbox_running_where_it_was(
    tmp_path: Path, database: str
) -> None:
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    registry = PostgresRegistry(database)
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            async with (
                serving(node_config(tmp_path, database, "a", dir_a), runtime) as a,
                serving(node_config(tmp_path, database, "b", dir_b), runtime) as b,
            ):
                await registry.open()
                nodes = PostgresNodes(registry)
                made = await a.create("s")
                # B heartbeats on, so it is a live target, but answers no call.
                await b.controller.server.stop(0)
                assert await nodes.set_draining("a", True)

                async def failures() -> dict[str, str] | None:
                    progress = await nodes.drain_progress("a")
                    assert progress is not None
                    return dict(progress.report.get("failed", {})) or None

                failed = await eventually(failures, "a's drain to report the failed move")
                assert list(failed) == [made.name], failed
                assert "did not take it over" in failed[made.name]
                assert await nodes.set_draining("a", False)

                record = await registry.get_live(PROJECT, "s")
                assert record is not None and (record.node, record.state) == ("a", State.RUNNING)
                assert record.uid in runtime.uids()  # resumed into a container again
                ran = await a.stub.ExecuteCode(
                    sandbox_pb2.ExecuteCodeRequest(name=made.name, code="after")
                )
                assert not ran.HasField("error"), ran
                assert not (tmp_path / "b" / "checkpoints" / f"{made.uid}.ckpt").exists()
                async with await psycopg.AsyncConnection.connect(database) as conn:
                    cursor = await conn.execute("SELECT count(*) FROM moves")
                    assert await cursor.fetchone() == (0,)  # given up: no token is left
    finally:
        await registry.close()
        await runtime.shutdown()


async def test_a_container_check_that_read_a_sandbox_before_it_moved_leaves_it_be(
    tmp_path: Path, database: str
) -> None:
    """A's container check read the sandbox RUNNING on A; it moved to B meanwhile, and A's
    container is gone: not a death to act on (it would terminate the sandbox on B)."""
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    registry = PostgresRegistry(database)
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            async with (
                serving(node_config(tmp_path, database, "a", dir_a), runtime) as a,
                serving(node_config(tmp_path, database, "b", dir_b), runtime),
            ):
                await registry.open()
                nodes = PostgresNodes(registry)
                await a.create("s")
                stale = await registry.get_live(PROJECT, "s")
                assert stale is not None and stale.node == "a"
                assert await nodes.set_draining("a", True)

                async def moved() -> bool | None:
                    record = await registry.get_live(PROJECT, "s")
                    assert record is not None
                    return True if (record.node, record.state) == ("b", State.RUNNING) else None

                await eventually(moved, "the sandbox to run on B")
                await a.controller.manager._reconciler._lost(stale, "its container vanished")
                record = await registry.get_live(PROJECT, "s")
                assert record is not None and (record.node, record.state) == ("b", State.RUNNING)
    finally:
        await registry.close()
        await runtime.shutdown()
