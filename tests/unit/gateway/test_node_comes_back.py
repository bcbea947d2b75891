"""A node that comes back after another node's sweep gave its sandboxes up, in the fast tier (two
real nodes on a fake podman and stand-in executors, a real PostgreSQL, a gateway): killed and
restarted under its name and state directory, or frozen long enough to be swept and then going
on with what it held in memory. A given-up sandbox stays TERMINATED everywhere and runs no code;
its container goes within a bounded time, also when a caller deleted it through another node
meanwhile; a create under way when it was given up does not bring it back RUNNING; warm pool
members whose rows the sweep forgot leave no container; PAUSED sandboxes, which the sweep
leaves alone, resume on their node."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.config import Config
from controller.gateway.forward import locate_in
from controller.gateway.server import start_gateway
from controller.pool_targets import PoolTarget
from controller.records import POOL_PROJECT, State
from controller.sandboxes import reconciler
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.postgres import fresh_database
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import (
    PROFILE,
    PROJECT,
    REPOSITORY,
    Petri,
    eventually,
    expect,
    fast_config,
    serving,
    short_runtime_dir,
    wait_until,
)
from tests.unit.controller.test_nodes import node_config
from tests.unit.gateway.test_drain_races import live

TERMINATED = sandbox_pb2.Sandbox.TERMINATED
GIVEN_UP = "node a stopped answering at "


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    # The container checks run every 2 s; a container unnamed this long at every check goes.
    monkeypatch.setattr(reconciler, "UNNAMED_GRACE_SECONDS", 0.5, raising=False)


@dataclass
class Hosts:
    """Two nodes on hosts of their own (each its podman), as in production: what one removes
    is not the other's to see."""

    a: Petri
    b: Petri
    registry: PostgresRegistry  # the test's own view of the shared registry
    nodes: PostgresNodes
    podman_a: FakeRuntime


def fast_node(tmp_path: Path, database: str, name: str, runtime_dir: Path, **config: Any) -> Config:
    # Its container checks every 0.1 s (60 s by default): the bound on the removals here.
    return replace(
        node_config(tmp_path, database, name, runtime_dir),
        container_check_interval=timedelta(milliseconds=100),
        **config,
    )


@contextlib.asynccontextmanager
async def two_hosts(tmp_path: Path, database: str, **a_config: Any) -> AsyncIterator[Hosts]:
    podman_a = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    podman_b = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    registry = PostgresRegistry(database)
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            async with (
                serving(fast_node(tmp_path, database, "a", dir_a, **a_config), podman_a) as a,
                serving(fast_node(tmp_path, database, "b", dir_b), podman_b) as b,
            ):
                await registry.open()
                yield Hosts(a, b, registry, PostgresNodes(registry), podman_a)
    finally:
        await registry.close()
        await podman_a.shutdown()
        await podman_b.shutdown()


@contextlib.contextmanager
def frozen(node: Petri) -> Iterator[None]:
    """The node does nothing on its schedule (heartbeats, container checks, reaper, auto-pause),
    as a SIGSTOPped process; its memory is kept, and it goes on at the end (SIGCONT)."""
    scheduler = node.controller.reaper._scheduler
    scheduler.pause()
    try:
        yield
    finally:
        scheduler.resume()


async def swept(pair: Hosts, sandbox_id: str) -> None:
    """Waits for B's sweep to give A's sandbox up."""

    async def given_up() -> bool | None:
        record = await live(pair.registry, sandbox_id)
        return True if record.given_up else None

    await eventually(given_up, f"B's sweep to give {sandbox_id} up")


async def test_a_frozen_node_that_goes_on_removes_what_was_given_up_and_runs_nothing_there(
    tmp_path: Path, database: str
) -> None:
    async with two_hosts(tmp_path, database) as pair:
        a, b, runtime = pair.a, pair.b, pair.podman_a
        kept = await a.create("kept")
        deleted = await a.create("deleted")
        paused = await a.create("paused")
        await a.execute(paused.name, "x = 1")
        await a.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=paused.name))
        with frozen(a):
            await swept(pair, "kept")
            await swept(pair, "deleted")
            assert (await live(pair.registry, "paused")).state is State.PAUSED  # left alone
            # Given up: any node answers for it, and ends it when asked.
            assert (await b.get(kept.name)).state == TERMINATED
            await b.delete(deleted.name)
        # A goes on, still holding both containers and their clients in memory.
        await wait_until(
            lambda: (
                runtime.container_of(kept.uid) is None and runtime.container_of(deleted.uid) is None
            ),
            "A to remove the containers of its sandboxes given up",
        )
        for node in (a, b):
            got = await node.get(kept.name)
            assert (got.state, got.state_message.startswith(GIVEN_UP)) == (TERMINATED, True)
            await expect(
                node.execute(kept.name, "y = 2"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "is TERMINATED",
                GIVEN_UP,
            )
            await expect(node.get(deleted.name), grpc.StatusCode.NOT_FOUND, "was deleted at")
        assert (await live(pair.registry, "kept")).state is State.TERMINATED
        # The PAUSED one resumes on its node, its variables kept.
        ran = await a.execute(paused.name, "x")
        assert not ran.HasField("error") and ran.namespace_restored, ran
        assert (await pair.registry.count_live(PROJECT)) == 2  # kept and paused
        await a.delete(kept.name)
        assert (await pair.registry.count_live(PROJECT)) == 1


async def test_a_create_under_way_when_its_node_was_given_up_does_not_come_back_running(
    tmp_path: Path, database: str
) -> None:
    async with two_hosts(tmp_path, database) as pair:
        a, runtime = pair.a, pair.podman_a
        runtime.starts_open.clear()  # a slow podman: the create is under way
        create = asyncio.ensure_future(a.create("late"))
        await wait_until(lambda: runtime.starts_waiting == 1, "A's start of the sandbox")
        with frozen(a):
            await swept(pair, "late")
            runtime.starts_open.set()  # the start ends after the sweep
            await expect(
                create,
                grpc.StatusCode.FAILED_PRECONDITION,
                "was given up while it started",
                "is TERMINATED",
            )
        record = await live(pair.registry, "late")
        assert record.state is State.TERMINATED and record.given_up, record
        assert runtime.container_of(record.uid) is None
        assert (await pair.b.get(record.name)).state == TERMINATED
        await pair.b.delete(record.name)
        assert (await pair.registry.count_live(PROJECT)) == 0


async def test_warm_pool_members_whose_rows_the_sweep_forgot_leave_no_container(
    tmp_path: Path, database: str
) -> None:
    pool = (PoolTarget(size=2, profile=PROFILE),)
    async with two_hosts(tmp_path, database, warm_pool=pool) as pair:
        a, runtime = pair.a, pair.podman_a
        members = a.controller.manager.warm_pool
        await wait_until(lambda: len(members.ready_uids()) == 2, "A's warm pool to fill")
        ghosts = members.ready_uids()
        label = a.controller.manager.registry_label

        async def pool_rows() -> set[str]:
            rows = await a.controller.registry.list_live()
            return {r.uid for r in rows if r.project == POOL_PROJECT}

        async def forgotten() -> bool | None:
            return True if not ghosts & await pool_rows() else None

        async def unnamed() -> set[str]:
            named = {r.container_name for r in await a.controller.registry.list_live()}
            listed = {c.name for c in await runtime.list_managed(label)}
            return listed - named

        with frozen(a):
            await eventually(forgotten, "B's sweep to forget A's pool members")
        await wait_until(
            lambda: not any(runtime.container_of(uid) for uid in ghosts),
            "A to remove the containers of the members the sweep forgot",
        )
        await wait_until(
            lambda: len(members.ready_uids()) == 2 and not ghosts & members.ready_uids(),
            "A's pool to fill again",
        )
        assert await unnamed() == set()
        made = await a.create("s")  # from a member that has a row
        assert made.state == sandbox_pb2.Sandbox.RUNNING
        assert await unnamed() == set()


async def test_a_create_that_finds_only_members_the_sweep_forgot_removes_them_and_starts_one(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "UNNAMED_GRACE_SECONDS", 3600.0, raising=False)
    pool = (PoolTarget(size=2, profile=PROFILE),)
    async with two_hosts(tmp_path, database, warm_pool=pool) as pair:
        a, runtime = pair.a, pair.podman_a
        members = a.controller.manager.warm_pool
        await wait_until(lambda: len(members.ready_uids()) == 2, "A's warm pool to fill")
        ghosts = members.ready_uids()

        async def forgotten() -> bool | None:
            rows = {r.uid for r in await a.controller.registry.list_live()}
            return True if not ghosts & rows else None

        with frozen(a):
            await eventually(forgotten, "B's sweep to forget A's pool members")
            # Before any container check: the create tries both, whose claims find no row.
            made = await a.create("s")
        assert made.state == sandbox_pb2.Sandbox.RUNNING and made.uid not in ghosts
        assert not any(runtime.container_of(uid) for uid in ghosts)


async def test_a_node_restarted_after_the_sweep_removes_what_was_given_up_and_keeps_the_paused(
    tmp_path: Path, database: str
) -> None:
    podman_a = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    podman_b = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            config_a = fast_node(tmp_path, database, "a", dir_a)
            async with serving(fast_node(tmp_path, database, "b", dir_b), podman_b) as b:
                async with serving(config_a, podman_a) as a:
                    kept = await a.create("kept")
                    deleted = await a.create("deleted")
                    paused = await a.create("paused")
                    await a.execute(paused.name, "x = 1")
                    await a.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=paused.name))
                    a.controller.reaper.stop()  # it stops heartbeating

                    async def given_up() -> bool | None:
                        got = await b.get(kept.name)
                        return True if got.state == TERMINATED else None

                    await eventually(given_up, "B's sweep")
                    await b.delete(deleted.name)
                    assert (await b.get(paused.name)).state == sandbox_pb2.Sandbox.PAUSED
                # Gone as a killed process: its containers run on.
                assert podman_a.container_of(kept.uid) is not None
                assert podman_a.container_of(deleted.uid) is not None
                async with serving(config_a, podman_a) as a:  # same name, same state directory
                    assert podman_a.container_of(kept.uid) is None
                    assert podman_a.container_of(deleted.uid) is None
                    for node in (a, b):
                        got = await node.get(kept.name)
                        assert got.state == TERMINATED and got.state_message.startswith(GIVEN_UP)
                        await expect(
                            node.execute(kept.name, "y = 2"),
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "is TERMINATED",
                        )
                    ran = await a.execute(paused.name, "x")
                    assert not ran.HasField("error") and ran.namespace_restored, ran
                    assert await b.names() == [kept.name, paused.name]
                    await b.delete(kept.name)  # its quota place goes once
                    assert await b.names() == [paused.name]
                    await expect(b.get(kept.name), grpc.StatusCode.NOT_FOUND, "was deleted at")
    finally:
        await podman_a.shutdown()
        await podman_b.shutdown()


async def test_a_gateway_answers_for_a_given_up_sandbox_after_its_node_came_back(
    tmp_path: Path, database: str
) -> None:
    async with two_hosts(tmp_path, database) as pair:
        a = pair.a
        config = fast_config(
            tmp_path / "gateway", a.config.runtime_dir, database_url=database, role="gateway"
        )
        gateway = await start_gateway(
            config,
            pair.nodes,
            locate_in(pair.registry),
            stale_after=timedelta(seconds=1),
            refresh_interval=0.05,
            connect_timeout=0.5,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
                made = await a.create("s")
                run = sandbox_pb2.ExecuteCodeRequest(name=made.name, code="x = 1")
                assert (await stub.ExecuteCode(run)).stdout == "ran x = 1\n"  # remembered: A
                with frozen(a):
                    await swept(pair, "s")
                get = sandbox_pb2.GetSandboxRequest(name=made.name)
                assert (await stub.GetSandbox(get)).state == TERMINATED
                await expect(
                    stub.ExecuteCode(run), grpc.StatusCode.FAILED_PRECONDITION, "is TERMINATED"
                )
                await wait_until(
                    lambda: pair.podman_a.container_of(made.uid) is None,
                    "A to remove the container of its sandbox given up",
                )
        finally:
            await gateway.stop(0)
