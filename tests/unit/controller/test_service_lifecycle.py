"""Create, claim, delete, request_id retries and quotas, through the real API of an in-process
controller whose containers are fakes: what a user sees when requests race."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from controller.errors import Unavailable
from controller.runtime.container import LABEL_EXECUTOR_KEY, LABEL_WORKER_UID
from controller.sandboxes import creation
from controller.sandboxes.warm_pool import PoolTarget
from petri.v1 import sandbox_pb2
from tests.unit.controller.inprocess import (
    PARENT,
    PROJECT,
    Petri,
    create_request,
    expect,
    fast_petri,
    wait_until,
)

RUNNING = sandbox_pb2.Sandbox.RUNNING
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
EXISTS = grpc.StatusCode.ALREADY_EXISTS


async def outcomes(
    calls: list[asyncio.Future[sandbox_pb2.Sandbox]],
) -> tuple[list[sandbox_pb2.Sandbox], list[grpc.aio.AioRpcError]]:
    """The sandboxes and the errors of calls made at once."""
    answers = await asyncio.gather(*calls, return_exceptions=True)
    made = [a for a in answers if isinstance(a, sandbox_pb2.Sandbox)]
    failed = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(made) + len(failed) == len(answers), answers
    return made, failed


def creates(
    petri: Petri, count: int, sandbox_id: str = ""
) -> list[asyncio.Future[sandbox_pb2.Sandbox]]:
    """`count` CreateSandbox calls sent at once."""
    request = create_request(sandbox_id)
    return [asyncio.ensure_future(petri.stub.CreateSandbox(request)) for _ in range(count)]


async def full_pool(petri: Petri, size: int) -> set[str]:
    """The uids of the ready pool members, once there are `size` (or more: a member given back
    after its replacement started)."""
    pool = petri.controller.manager.warm_pool
    await wait_until(lambda: len(pool.ready_uids()) >= size, f"{size} pool members ready")
    return pool.ready_uids()


async def test_a_sandbox_runs_in_a_container_of_its_own_until_deleted(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one", labels={"team": "ml"})
        assert sandbox.state == RUNNING and sandbox.name == f"{PARENT}/sandboxes/one"
        container = petri.runtime.container_of(sandbox.uid)
        assert container is not None and container.running
        # A restarted controller finds the executor's key and user code's uid on the container.
        assert container.spec.labels[LABEL_EXECUTOR_KEY]
        assert int(container.spec.labels[LABEL_WORKER_UID]) >= 10000
        assert (await petri.execute(sandbox.name, "1")).stdout == "ran 1\n"
        assert await petri.names() == [sandbox.name]

        await petri.delete(sandbox.name)
        await expect(petri.get(sandbox.name), grpc.StatusCode.NOT_FOUND, "was deleted at")
        assert petri.runtime.container_of(sandbox.uid) is None
        assert not container.spec.socket_dir.exists()
        assert await petri.names() == []
        await expect(petri.delete(sandbox.name), grpc.StatusCode.NOT_FOUND, "was deleted at")
        await petri.stub.DeleteSandbox(
            sandbox_pb2.DeleteSandboxRequest(name=sandbox.name, allow_missing=True)
        )


async def test_concurrent_creates_claim_each_pool_member_once(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, warm_pool=(PoolTarget(size=2),)) as petri:
        members = await full_pool(petri, 2)
        made, failed = await outcomes(creates(petri, 6))
        assert not failed
        uids = [sandbox.uid for sandbox in made]
        assert len(set(uids)) == 6  # no member handed out twice
        assert members <= set(uids)  # both were claimed, none lost
        assert all(s.state == RUNNING for s in made)
        assert len(await petri.names()) == 6  # members are shown only once claimed
        # Claimed members are replaced; every sandbox keeps a container of its own.
        refilled = await full_pool(petri, 2)
        assert not refilled & set(uids)
        assert petri.runtime.uids() == set(uids) | refilled
        for sandbox in made:
            assert (await petri.execute(sandbox.name, "x")).stdout == "ran x\n"


async def test_a_claim_over_quota_gives_the_member_back(tmp_path: Path) -> None:
    async with fast_petri(
        tmp_path, warm_pool=(PoolTarget(size=2),), max_sandboxes_per_project=1
    ) as petri:
        members = await full_pool(petri, 2)
        first = await petri.create()
        assert first.uid in members
        await expect(petri.create(), EXHAUSTED, "its quota of 1")
        # The member the refused create took is still there for the next one.
        assert members - {first.uid} <= petri.controller.manager.warm_pool.ready_uids()
        assert await petri.names() == [first.name]


async def test_concurrent_creates_of_one_sandbox_id_make_one_sandbox(tmp_path: Path) -> None:
    for pool in ((), (PoolTarget(size=2),)):
        async with fast_petri(tmp_path / str(len(pool)), warm_pool=pool) as petri:
            members = await full_pool(petri, 2) if pool else set()
            made, failed = await outcomes(creates(petri, 5, sandbox_id="same"))
            assert len(made) == 1, failed
            assert {e.code() for e in failed} == {EXISTS}
            assert await petri.names() == [f"{PARENT}/sandboxes/same"]
            # The losers' members went back to the pool: none is lost or shown.
            assert members - {made[0].uid} <= await full_pool(petri, len(pool) and 2)


async def test_a_retry_while_the_first_create_starts_gets_the_same_sandbox(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        petri.runtime.starts_open.clear()  # a slow podman
        request = create_request("slow", request_id="req-1", labels={"a": "b"})
        first = asyncio.ensure_future(petri.stub.CreateSandbox(request))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        retry = asyncio.ensure_future(petri.stub.CreateSandbox(request))
        others = [asyncio.ensure_future(petri.stub.CreateSandbox(request)) for _ in range(3)]
        petri.runtime.starts_open.set()
        answers = await asyncio.gather(first, retry, *others)
        assert {(a.name, a.uid, a.state) for a in answers} == {
            (answers[0].name, answers[0].uid, RUNNING)
        }
        assert petri.runtime.starts == 1
        # Later too, and also for a retry that leaves the sandbox_id to the server.
        again = await petri.stub.CreateSandbox(request)
        assert again.uid == answers[0].uid
        unnamed = create_request(request_id="req-2")
        assert (await petri.stub.CreateSandbox(unnamed)).uid == (
            await petri.stub.CreateSandbox(unnamed)
        ).uid


async def test_a_retry_on_a_node_not_starting_the_sandbox_gets_it_once_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes share the registry: a retry that reaches another node than the first request's
    finds its row PROVISIONING with no start of its own under way, and answers it RUNNING."""
    async with fast_petri(tmp_path) as petri:
        petri.runtime.starts_open.clear()  # a slow podman
        request = create_request("slow", request_id="req-1")
        first = asyncio.ensure_future(petri.stub.CreateSandbox(request))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        # From here on this controller is the other node: the start is none of its own.
        lifecycle = petri.controller.manager._lifecycle
        monkeypatch.setattr(lifecycle, "provisioning", lambda uid: None)
        registry = petri.controller.registry
        reads = 0
        read = registry.get_by_request_id

        async def counted(project: str, request_id: str) -> object:
            nonlocal reads
            reads += 1
            return await read(project, request_id)

        monkeypatch.setattr(registry, "get_by_request_id", counted)
        retry = asyncio.ensure_future(petri.stub.CreateSandbox(request))
        # It answered, or it read the row more than once: it waits for the start's end.
        await wait_until(lambda: retry.done() or reads >= 2, "the retry to read the row")
        petri.runtime.starts_open.set()
        answers = await asyncio.gather(first, retry)
        assert {(a.name, a.uid, a.state) for a in answers} == {
            (answers[0].name, answers[0].uid, RUNNING)
        }
        assert petri.runtime.starts == 1


async def test_a_request_id_reused_for_another_request_is_already_exists(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        request = create_request("first", request_id="req", labels={"team": "ml"})
        made = await petri.stub.CreateSandbox(request)
        other = create_request("first", request_id="req", labels={"team": "web"})
        other.sandbox.ttl.FromSeconds(60)
        await expect(
            petri.stub.CreateSandbox(other),
            EXISTS,
            "was already used by a different CreateSandbox",
            "sandbox.labels, sandbox.ttl",
            made.name,
        )
        await petri.delete(made.name)
        await expect(petri.stub.CreateSandbox(request), EXISTS, "which was deleted at")
        assert petri.runtime.starts == 1


async def test_concurrent_creates_never_exceed_the_project_quota(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, max_sandboxes_per_project=3) as petri:
        made, failed = await outcomes(creates(petri, 8))
        assert len(made) == 3
        assert {e.code() for e in failed} == {EXHAUSTED}
        assert all("its quota of 3: delete some first" in (e.details() or "") for e in failed)
        assert len(await petri.names()) == 3
        await petri.delete(made[0].name)
        await petri.create()  # room again


async def test_creates_beyond_the_concurrent_limit_wait_their_turn_in_order(
    tmp_path: Path,
) -> None:
    """Beyond --max-concurrent-creates a create waits in line (first come, first served)
    rather than failing: RESOURCE_EXHAUSTED is for the caller's own quotas."""
    async with fast_petri(tmp_path, max_concurrent_creates=1) as petri:
        slots = petri.controller.manager.create_slots
        metrics = petri.controller.manager.metrics.registry
        petri.runtime.starts_open.clear()
        calls = [asyncio.ensure_future(petri.create("a"))]
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        for waiting, sandbox_id in enumerate(("b", "c", "d"), start=1):
            calls.append(asyncio.ensure_future(petri.create(sandbox_id)))
            await wait_until(lambda: slots.waiting == waiting, f"{sandbox_id} in line")  # noqa: B023
        assert metrics.get_sample_value("petri_create_queue") == 3
        petri.runtime.starts_open.set()
        made = await asyncio.gather(*calls)
        assert [sandbox.state for sandbox in made] == [RUNNING] * 4
        started = [name.removeprefix("petri-") for name in petri.runtime.containers]
        assert started == [sandbox.uid for sandbox in made]  # in the order they came
        assert slots.taken == 0 and slots.waiting == 0
        waits = {"waiter": "create"}
        assert metrics.get_sample_value("petri_create_queue_seconds_count", waits) == 4


async def test_a_create_whose_deadline_passes_in_line_leaves_nothing(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, max_concurrent_creates=1, max_sandboxes_per_project=2) as petri:
        slots = petri.controller.manager.create_slots
        petri.runtime.starts_open.clear()
        first = asyncio.ensure_future(petri.create("first"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        late = petri.stub.CreateSandbox(create_request("late", "r-late"), timeout=0.3)
        await expect(late, grpc.StatusCode.DEADLINE_EXCEEDED)
        await wait_until(lambda: slots.waiting == 0, "the late create to leave the line")
        petri.runtime.starts_open.set()
        await first
        # Nothing of it: no row, no container, no quota used, its request_id free.
        assert await petri.controller.registry.get_by_request_id(PROJECT, "r-late") is None
        assert len(petri.runtime.containers) == 1
        assert (await petri.create("late", "r-late")).state == RUNNING  # the quota's 2nd
        assert slots.taken == 0


async def test_a_create_whose_deadline_cannot_cover_a_start_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(creation, "FIRST_START_ESTIMATE", 60.0)  # a start takes a minute
    async with fast_petri(tmp_path) as petri:
        call = petri.stub.CreateSandbox(create_request("quick", "r-quick"), timeout=10)
        await expect(
            call,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "deadline leaves no time to start a sandbox (about 60.0 s each now",
            "nothing was created; retry, with a longer deadline",
        )
        assert petri.runtime.starts == 0 and petri.runtime.containers == {}
        assert await petri.controller.registry.get_by_request_id(PROJECT, "r-quick") is None
        assert (await petri.create("quick", "r-quick")).state == RUNNING  # no deadline


async def test_a_create_cancelled_in_line_leaves_it(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, max_concurrent_creates=1) as petri:
        slots = petri.controller.manager.create_slots
        petri.runtime.starts_open.clear()
        first = asyncio.ensure_future(petri.create("first"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        leaving = petri.stub.CreateSandbox(create_request("leaving", "r-leaving"))
        staying = asyncio.ensure_future(petri.create("staying"))
        await wait_until(lambda: slots.waiting == 2, "both in line")
        leaving.cancel()
        await wait_until(lambda: slots.waiting == 1, "the cancelled create to leave the line")
        petri.runtime.starts_open.set()
        await first
        assert (await staying).state == RUNNING
        assert await petri.controller.registry.get_by_request_id(PROJECT, "r-leaving") is None
        assert sorted(await petri.names()) == [
            f"{PARENT}/sandboxes/{n}" for n in ("first", "staying")
        ]
        assert slots.taken == 0 and slots.waiting == 0


async def test_a_failed_start_leaves_nothing_and_frees_its_slot(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, max_concurrent_creates=1) as petri:
        petri.runtime.start_error = Unavailable("podman is not answering")
        await expect(petri.create("a"), grpc.StatusCode.UNAVAILABLE, "podman is not answering")
        petri.runtime.start_error = None
        petri.runtime.crash_on_start = "ModuleNotFoundError: No module named 'grpc'"
        await expect(
            petri.create("a"),
            grpc.StatusCode.UNAVAILABLE,
            "container exited with status 1: ModuleNotFoundError",
            "while starting",
        )
        assert petri.runtime.containers == {}  # the exited container was removed
        await expect(petri.get(f"{PARENT}/sandboxes/a"), grpc.StatusCode.NOT_FOUND, "not exist")
        petri.runtime.crash_on_start = None
        assert (await petri.create("a")).state == RUNNING  # same id, and a slot is free


async def test_executions_beyond_the_per_minute_quota_are_refused(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, max_executes_per_minute=3) as petri:
        sandbox = await petri.create()
        for _ in range(3):
            await petri.execute(sandbox.name, "1")
        await expect(
            petri.execute(sandbox.name, "1"), EXHAUSTED, "its quota of 3 per minute: retry later"
        )
        executor = petri.runtime.executor_of(sandbox.uid)
        assert len(executor.executions) == 3


async def test_list_shows_only_live_sandboxes(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        kept = await petri.create("kept")
        gone = await petri.create("gone")
        await petri.delete(gone.name)
        assert await petri.names() == [kept.name]


async def test_a_create_whose_caller_gives_up_finishes_for_its_retry(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        petri.runtime.starts_open.clear()
        request = create_request("patient", request_id="req-gone")
        call = petri.stub.CreateSandbox(request)
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the create to start")
        call.cancel()  # the client went away mid-create
        petri.runtime.starts_open.set()
        retried = await petri.stub.CreateSandbox(request)
        assert retried.state == RUNNING and petri.runtime.starts == 1
        assert petri.runtime.uids() == {retried.uid}


async def test_a_delete_during_the_create_waits_for_it_and_leaves_nothing(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        petri.runtime.starts_open.clear()
        create = asyncio.ensure_future(petri.create("brief"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the create to start")
        delete = asyncio.ensure_future(petri.delete(f"{PARENT}/sandboxes/brief"))
        petri.runtime.starts_open.set()
        made = await create
        await delete
        assert made.state == RUNNING
        await expect(petri.get(made.name), grpc.StatusCode.NOT_FOUND, "was deleted at")
        assert petri.runtime.uids() == set()
