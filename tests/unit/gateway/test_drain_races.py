"""A drain's moves racing other calls, failures and crashes, in the fast tier (two real nodes
on a fake podman and stand-in executors, a real PostgreSQL): a delete or an expiry that read
the sandbox before it moved does not end it on its new node; a replayed take-over does not
remove the copy the first one kept; a checkpoint file no sandbox of the node names (a crash
mid-move) goes at the node's next start; a target refuses a sandbox it cannot run or has no
room for; a busy sandbox holds up no other; a failed pause, record or read leaves the sandbox
where it was, saying why (a target that takes no call: RUNNING again where it was, no move
left); a container check that read the sandbox before it moved leaves it be; what a move keeps,
and what two drains at once or an undo do."""

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2

from controller.errors import FailedPrecondition, ResourceExhausted, Unavailable
from controller.records import Runtime, SandboxRecord, State
from controller.runtime.container import LABEL_REGISTRY
from controller.sandboxes import moves
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry
from petri.v1 import sandbox_pb2
from tests.postgres import fresh_database
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import (
    PROFILE,
    PROJECT,
    REPOSITORY,
    Petri,
    eventually,
    expect,
    serving,
    short_runtime_dir,
    wait_until,
)
from tests.unit.controller.standin_executor import Hang
from tests.unit.controller.test_nodes import node_config

TOKEN = "k" * 43


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@dataclass
class Pair:
    a: Petri
    b: Petri
    registry: PostgresRegistry  # the test's own view of the shared registry
    nodes: PostgresNodes
    runtime: FakeRuntime


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path, database: str, **b_config: Any) -> AsyncIterator[Pair]:
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    registry = PostgresRegistry(database)
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            config_b = replace(node_config(tmp_path, database, "b", dir_b), **b_config)
            async with (
                serving(node_config(tmp_path, database, "a", dir_a), runtime) as a,
                serving(config_b, runtime) as b,
            ):
                await registry.open()
                yield Pair(a, b, registry, PostgresNodes(registry), runtime)
    finally:
        await registry.close()
        await runtime.shutdown()


async def live(registry: PostgresRegistry, sandbox_id: str) -> SandboxRecord:
    record = await registry.get_live(PROJECT, sandbox_id)
    assert record is not None, sandbox_id
    return record


def checkpoint(tmp_path: Path, node: str, uid: str) -> Path:
    return tmp_path / node / "checkpoints" / f"{uid}.ckpt"


async def move_to_b(database: str, uid: str) -> None:
    """A move of sandbox `uid` from A to B with TOKEN, as A records one."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO moves (uid, source, target, token_hash, resume) "
            "VALUES (%s, 'a', 'b', %s, false)",
            (uid, hashlib.sha256(TOKEN.encode()).hexdigest()),
        )


async def one_piece(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_delete_or_expiry_that_read_the_sandbox_before_it_moved_leaves_it_to_its_node(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        a, b, registry = pair.a, pair.b, pair.registry
        made = await a.create("s")
        stale = await live(registry, "s")
        assert stale.node == "a"
        assert await pair.nodes.set_draining("a", True)

        async def on_b() -> SandboxRecord | None:
            record = await live(registry, "s")
            return record if (record.node, record.state) == ("b", State.RUNNING) else None

        moved = await eventually(on_b, "the sandbox to run on B")
        assert await pair.nodes.set_draining("a", False)

        # A's reaper read it expired on A before the switch, and ends it after.
        await a.controller.manager.expire(stale)
        # A's DeleteSandbox read it on A before the switch, and deletes it after: refused as
        # held by B (a gateway sends it there), rather than ending B's sandbox from A.
        real_get_live = a.controller.registry.get_live
        reads: list[str] = []

        async def stale_first(project: str, sandbox_id: str) -> SandboxRecord | None:
            reads.append(sandbox_id)
            return stale if len(reads) == 1 else await real_get_live(project, sandbox_id)

        monkeypatch.setattr(a.controller.registry, "get_live", stale_first)
        await expect(
            a.stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "held by node b",
            "nothing was done",
            "calling again through a gateway",
        )
        record = await live(registry, "s")
        assert (record.node, record.state) == ("b", State.RUNNING)
        assert record.container_name == moved.container_name
        assert record.container_name in pair.runtime.containers
        assert checkpoint(tmp_path, "b", made.uid).is_file()
        await b.delete(made.name)  # its node ends it
        assert await registry.get_live(PROJECT, "s") is None
        assert record.container_name not in pair.runtime.containers


async def test_a_replayed_take_over_does_not_remove_the_copy_the_first_one_kept(
    tmp_path: Path, database: str
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        a, b = pair.a, pair.b
        made = await a.create("s")
        await a.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=made.name))
        data = checkpoint(tmp_path, "a", made.uid).read_bytes()
        await move_to_b(database, made.uid)
        first_in, replayed = asyncio.Event(), asyncio.Event()

        async def first() -> AsyncIterator[bytes]:
            yield data[:100]
            first_in.set()
            await replayed.wait()  # the replay went as far as it could meanwhile
            yield data[100:]

        async def replay() -> AsyncIterator[bytes]:
            replayed.set()
            yield data

        receive = b.controller.manager.receive_move
        call = asyncio.ensure_future(receive(made.uid, made.name, TOKEN, first()))
        reading = asyncio.ensure_future(first_in.wait())
        await asyncio.wait({call, reading}, return_when=asyncio.FIRST_COMPLETED)
        if call.done():  # it ended before reading the rest: fail with its error, not hang
            reading.cancel()
            raise AssertionError(f"the first take-over ended early: {call.exception()!r}")
        second = asyncio.ensure_future(receive(made.uid, made.name, TOKEN, replay()))
        second.add_done_callback(lambda _: replayed.set())
        await call
        with pytest.raises(FailedPrecondition):
            await second
        record = await live(pair.registry, "s")
        assert (record.node, record.state) == ("b", State.PAUSED)
        assert checkpoint(tmp_path, "b", made.uid).read_bytes() == data
        ran = await b.execute(made.name, "after")  # resumes on B from its copy
        assert not ran.HasField("error"), ran


async def test_a_checkpoint_no_sandbox_of_the_node_names_goes_at_its_next_start(
    tmp_path: Path, database: str
) -> None:
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            config_b = node_config(tmp_path, database, "b", dir_b)
            async with serving(node_config(tmp_path, database, "a", dir_a), runtime) as a:
                async with serving(config_b, runtime) as b:
                    moving = await a.create("moving")
                    own = await b.create("own")
                    for node, sandbox in ((a, moving), (b, own)):
                        await node.stub.PauseSandbox(
                            sandbox_pb2.PauseSandboxRequest(name=sandbox.name)
                        )
                # B crashed after writing its copy of A's sandbox, before the switch.
                orphan = checkpoint(tmp_path, "b", moving.uid)
                shutil.copy(checkpoint(tmp_path, "a", moving.uid), orphan)
                async with serving(config_b, runtime) as b:
                    assert not orphan.exists()
                    assert checkpoint(tmp_path, "b", own.uid).is_file()
                    assert checkpoint(tmp_path, "a", moving.uid).is_file()
                    for node, sandbox in ((a, moving), (b, own)):
                        ran = await node.execute(sandbox.name, "after")
                        assert not ran.HasField("error"), ran
    finally:
        await runtime.shutdown()


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ({"runtime": Runtime.GVISOR}, "runtime GVISOR is not available"),
        ({"image_profile": "elsewhere"}, "image profile 'elsewhere' is not available"),
    ],
)
async def test_a_node_that_cannot_run_a_sandbox_does_not_take_it_over(
    tmp_path: Path, database: str, spec: dict[str, Any], why: str
) -> None:
    """A gVisor sandbox drained to a node without gVisor (the fast tier has none: the row
    says GVISOR), or one of an image profile the node has no image of, stays on its node, and
    the drain report says why, rather than being stranded on a node that fails every resume."""
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        made = await a.create("s")
        await a.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=made.name))
        record = await live(registry, "s")
        unrunnable = replace(record.spec, **spec)
        assert await registry.set_fields(record.uid, spec=unrunnable)
        assert await pair.nodes.set_draining("a", True)

        async def failures() -> dict[str, str] | None:
            progress = await pair.nodes.drain_progress("a")
            assert progress is not None
            return dict(progress.report.get("failed", {})) or None

        failed = await eventually(failures, "a's drain to report the failed move")
        assert why in failed[made.name], failed
        assert await pair.nodes.set_draining("a", False)
        record = await live(registry, "s")
        assert (record.node, record.state, record.spec) == ("a", State.PAUSED, unrunnable)
        assert checkpoint(tmp_path, "a", made.uid).is_file()
        assert not checkpoint(tmp_path, "b", made.uid).exists()


async def test_a_node_full_by_its_own_count_does_not_take_a_sandbox_over(
    tmp_path: Path, database: str
) -> None:
    """The source placed it by heartbeated figures, which may be older than the moves it made
    since: the target counts its own."""
    async with two_nodes(tmp_path, database, max_sandboxes_per_node=1) as pair:
        a, b = pair.a, pair.b
        await b.create("own")
        made = await a.create("s")
        await a.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=made.name))
        data = checkpoint(tmp_path, "a", made.uid).read_bytes()
        await move_to_b(database, made.uid)
        with pytest.raises(ResourceExhausted, match="holds its most sandboxes"):
            await b.controller.manager.receive_move(made.uid, made.name, TOKEN, one_piece(data))
        record = await live(pair.registry, "s")
        assert (record.node, record.state) == ("a", State.PAUSED)
        assert not checkpoint(tmp_path, "b", made.uid).exists()


async def test_a_drain_moves_the_idle_sandboxes_without_waiting_for_a_busy_one(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox running a long execution is moved after it ends; the others do not wait."""
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        hang = Hang()
        pair.runtime.scripts["hang"] = hang
        busy = await a.create("busy")
        await a.create("idle")
        running = asyncio.ensure_future(a.execute(busy.name, "hang"))
        await hang.began.wait()
        real_list_live = a.controller.registry.list_live

        async def busy_first() -> list[SandboxRecord]:  # the order is the database's
            return sorted(await real_list_live(), key=lambda r: r.uid != busy.uid)

        monkeypatch.setattr(a.controller.registry, "list_live", busy_first)
        assert await pair.nodes.set_draining("a", True)

        async def on_b(sandbox_id: str) -> SandboxRecord | None:
            record = await live(registry, sandbox_id)
            return record if (record.node, record.state) == ("b", State.RUNNING) else None

        await eventually(lambda: on_b("idle"), "the idle sandbox to run on B")
        assert (await live(registry, "busy")).node == "a"
        assert not running.done()
        running.cancel()  # its caller leaves: the execution ends, and the move goes on
        await hang.interrupted.wait()
        await eventually(lambda: on_b("busy"), "the busy sandbox to run on B")


async def test_a_sandbox_whose_pause_fails_stays_running_on_its_node_until_it_can_be_saved(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(moves, "MOVE_RETRY_AFTER", timedelta(0))  # tried again each round
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        made = await a.create("s")
        executor = await a.executor(made.name)
        executor.checkpoint_failure = grpc.StatusCode.UNAVAILABLE  # it cannot be saved
        assert await pair.nodes.set_draining("a", True)

        async def failures() -> dict[str, str] | None:
            progress = await pair.nodes.drain_progress("a")
            assert progress is not None
            return dict(progress.report.get("failed", {})) or None

        failed = await eventually(failures, "a's drain to report the failed pause")
        assert "did not complete the checkpoint" in failed[made.name], failed
        record = await live(registry, "s")
        assert (record.node, record.state) == ("a", State.RUNNING)
        ran = await a.execute(made.name, "meanwhile")
        assert not ran.HasField("error"), ran
        executor.checkpoint_failure = None

        async def on_b() -> SandboxRecord | None:
            record = await live(registry, "s")
            return record if (record.node, record.state) == ("b", State.RUNNING) else None

        await eventually(on_b, "the sandbox to run on B once it could be saved")


async def test_a_moved_sandbox_keeps_its_settings_and_counts_once_in_its_project(
    tmp_path: Path, database: str
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        a, b, registry = pair.a, pair.b, pair.registry
        made = await a.create(
            "s",
            display_name="mine",
            labels={"team": "x"},
            ttl=duration_pb2.Duration(seconds=3600),
            auto_pause_after=duration_pb2.Duration(seconds=600),
            spec=sandbox_pb2.SandboxSpec(
                resources=sandbox_pb2.Resources(memory_bytes=300 << 20, max_processes=100)
            ),
        )
        before = await live(registry, "s")
        assert await pair.nodes.set_draining("a", True)

        async def on_b() -> SandboxRecord | None:
            record = await live(registry, "s")
            return record if (record.node, record.state) == ("b", State.RUNNING) else None

        after = await eventually(on_b, "the sandbox to run on B")
        kept = ("uid", "display_name", "labels", "spec", "create_time", "expire_time")
        assert [getattr(after, f) for f in kept] == [getattr(before, f) for f in kept]
        assert after.auto_pause_after == before.auto_pause_after == timedelta(minutes=10)
        assert dict(after.labels) == {"team": "x"}
        assert after.spec.resources.memory_bytes == 300 << 20
        got = await b.get(made.name)
        assert (got.display_name, dict(got.labels)) == ("mine", {"team": "x"})
        assert await registry.count_live(PROJECT) == 1
        assert await b.names() == await a.names() == [made.name]


async def test_two_nodes_drained_at_once_keep_their_sandboxes_rather_than_swap_them(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(moves, "MOVE_RETRY_AFTER", timedelta(0))  # tried again each round
    async with two_nodes(tmp_path, database) as pair:
        a, b, registry = pair.a, pair.b, pair.registry
        on_a, on_b = await a.create("on-a"), await b.create("on-b")
        assert await pair.nodes.set_draining("a", True)
        assert await pair.nodes.set_draining("b", True)
        for node, sandbox in (("a", on_a), ("b", on_b)):

            async def failures(node: str = node) -> dict[str, str] | None:
                progress = await pair.nodes.drain_progress(node)
                assert progress is not None
                return dict(progress.report.get("failed", {})) or None

            failed = await eventually(failures, f"{node}'s drain to report its failed move")
            assert "no live node that is not draining" in failed[sandbox.name], failed
        assert (await live(registry, "on-a")).node == "a"
        assert (await live(registry, "on-b")).node == "b"
        assert await pair.nodes.set_draining("b", False)  # B takes A's; A may not take B's

        async def moved() -> bool | None:
            record = await live(registry, "on-a")
            return True if (record.node, record.state) == ("b", State.RUNNING) else None

        await eventually(moved, "A's sandbox to run on B")
        assert (await live(registry, "on-b")).node == "b"


async def test_a_move_the_registry_fails_to_record_leaves_the_sandbox_running(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL restarting as the move is recorded: the sandbox, paused for the move, is
    resumed where it is, as after any failed move."""
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        made = await a.create("s")
        ledger = a.controller.manager._mover._ledger
        assert ledger is not None

        async def unrecorded(*_: object) -> None:
            raise Unavailable("the registry's database is not answering")

        monkeypatch.setattr(ledger, "begin", unrecorded)
        assert await pair.nodes.set_draining("a", True)

        async def failures() -> dict[str, str] | None:
            progress = await pair.nodes.drain_progress("a")
            assert progress is not None
            return dict(progress.report.get("failed", {})) or None

        failed = await eventually(failures, "a's drain to report the failed move")
        assert "not answering" in failed[made.name], failed
        record = await live(registry, "s")
        assert (record.node, record.state) == ("a", State.RUNNING)
        assert record.container_name in pair.runtime.containers


async def test_a_drain_undone_mid_move_finishes_that_move_and_starts_no_other(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        first = await a.create("first")
        await a.create("second")
        real_list_live = a.controller.registry.list_live

        async def first_first() -> list[SandboxRecord]:  # the order is the database's
            return sorted(await real_list_live(), key=lambda r: r.uid != first.uid)

        monkeypatch.setattr(a.controller.registry, "list_live", first_first)
        executor = await a.executor(first.name)
        executor.checkpoint_hold = asyncio.Event()  # the move's pause takes long
        assert await pair.nodes.set_draining("a", True)
        await wait_until(lambda: executor.checkpoints == 1, "the move's pause to begin")
        assert await pair.nodes.set_draining("a", False)
        await wait_until(lambda: not a.controller.manager._mover.draining, "a to stop draining")
        executor.checkpoint_hold.set()

        async def on_b() -> SandboxRecord | None:
            record = await live(registry, "first")
            return record if (record.node, record.state) == ("b", State.RUNNING) else None

        await eventually(on_b, "the sandbox under way to run on B")
        await wait_until(lambda: a.controller.manager._mover.moved == 1, "the move to end")
        record = await live(registry, "second")
        assert (record.node, record.state) == ("a", State.RUNNING)


async def test_a_moved_sandbox_s_old_container_goes_before_its_new_node_starts_one(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes on one podman (one host): the sandbox's container has the same name on
    either; the source's release of its old one (after the pause, in the background) must not
    remove the one its new node started."""
    async with two_nodes(tmp_path, database) as pair:
        a, b, registry = pair.a, pair.b, pair.registry
        made = await a.create("s")
        name = (await live(registry, "s")).container_name
        provisioner = a.controller.manager._provisioner
        release, wait_released = provisioner._release, provisioner.wait_released
        go = asyncio.Event()

        async def slow_release(held: Any) -> None:  # podman takes its time
            await go.wait()
            await release(held)

        async def waited(uid: str) -> None:
            go.set()  # the move waits for it: it may go
            await wait_released(uid)

        monkeypatch.setattr(provisioner, "_release", slow_release)
        monkeypatch.setattr(provisioner, "wait_released", waited)

        def b_started_one() -> bool:
            container = pair.runtime.containers.get(name)
            label = None if container is None else container.spec.labels.get(LABEL_REGISTRY)
            return label == b.controller.manager.registry_label

        async def let_go_once_b_started_one() -> None:
            await wait_until(b_started_one, "B to start the sandbox's container")
            go.set()

        watcher = asyncio.ensure_future(let_go_once_b_started_one())
        try:
            assert await pair.nodes.set_draining("a", True)

            async def on_b() -> SandboxRecord | None:
                record = await live(registry, "s")
                return record if (record.node, record.state) == ("b", State.RUNNING) else None

            await eventually(on_b, "the sandbox to run on B")
            await wait_until(lambda: not provisioner._releasing, "A's release to end")
            assert b_started_one()
            ran = await b.execute(made.name, "after")
            assert not ran.HasField("error"), ran
        finally:
            watcher.cancel()


async def test_a_checkpoint_the_source_cannot_read_fails_the_move_and_says_why(
    tmp_path: Path, database: str
) -> None:
    """Not a cancelled round (gRPC cancels a call whose messages fail) that reports nothing
    and starts again at once, pausing a running sandbox each time."""
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        made = await a.create("s")
        await a.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=made.name))
        checkpoint(tmp_path, "a", made.uid).unlink()  # lost to a disk failure, say
        assert await pair.nodes.set_draining("a", True)

        async def failures() -> dict[str, str] | None:
            progress = await pair.nodes.drain_progress("a")
            assert progress is not None
            return dict(progress.report.get("failed", {})) or None

        failed = await eventually(failures, "a's drain to report the failed move")
        why = failed[made.name]
        assert "the checkpoint could not be read to send it: no checkpoint" in why, failed
        record = await live(registry, "s")
        assert (record.node, record.state) == ("a", State.PAUSED)


async def test_a_move_the_target_does_not_take_leaves_the_sandbox_running_where_it_was(
    tmp_path: Path, database: str
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        a, b, registry, nodes = pair.a, pair.b, pair.registry, pair.nodes
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

        record = await live(registry, "s")
        assert (record.node, record.state) == ("a", State.RUNNING)
        assert record.uid in pair.runtime.uids()  # resumed into a container again
        ran = await a.execute(made.name, "after")
        assert not ran.HasField("error"), ran
        assert not checkpoint(tmp_path, "b", made.uid).exists()
        async with await psycopg.AsyncConnection.connect(database) as conn:
            cursor = await conn.execute("SELECT count(*) FROM moves")
            assert await cursor.fetchone() == (0,)  # given up: no token is left


async def test_a_container_check_that_read_a_sandbox_before_it_moved_leaves_it_be(
    tmp_path: Path, database: str
) -> None:
    """A's container check read the sandbox RUNNING on A; it moved to B meanwhile, and A's
    container is gone: not a death to act on (it would terminate the sandbox on B)."""
    async with two_nodes(tmp_path, database) as pair:
        a, registry = pair.a, pair.registry
        await a.create("s")
        stale = await live(registry, "s")
        assert stale.node == "a"
        assert await pair.nodes.set_draining("a", True)

        async def moved() -> bool | None:
            record = await live(registry, "s")
            return True if (record.node, record.state) == ("b", State.RUNNING) else None

        await eventually(moved, "the sandbox to run on B")
        await a.controller.manager._reconciler._lost(stale, "its container vanished")
        record = await live(registry, "s")
        assert (record.node, record.state) == ("b", State.RUNNING)
