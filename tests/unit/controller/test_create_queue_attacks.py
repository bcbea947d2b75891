"""The create line and the start estimate under attack: cancels at every moment, a poisoned
estimate, floods from one project, retries of a queued create."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.pool_targets import KindBounds
from controller.sandboxes import creation, quotas
from controller.sandboxes.quotas import CreateSlots
from controller.sandboxes.warm_pool import PoolMembers, PoolTarget
from petri.v1 import sandbox_pb2
from tests.unit.controller.inprocess import create_request, expect, fast_petri, wait_until
from tests.unit.controller.test_service_lifecycle import full_pool
from tests.unit.controller.test_warm_pool import FULL, Discards, Starter, demand, next_pass, until

RUNNING = sandbox_pb2.Sandbox.RUNNING


async def test_two_hundred_cancels_at_random_moments_leak_no_slot() -> None:
    """Waiters cancelled before, at and after the moment their slot is granted: every slot
    comes back, and the limit's worth of starts can still run at once."""
    rng = random.Random(16)
    slots = CreateSlots(3)
    held: list[int] = []

    async def start(index: int) -> None:
        refill = index % 5 == 0
        await slots.take(None, refill=refill)
        held.append(index)
        try:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        finally:
            held.remove(index)
            slots.release(refill)

    tasks = [asyncio.ensure_future(start(index)) for index in range(200)]
    for task in tasks:
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
        if rng.random() < 0.7:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert held == [] and slots.taken == 0 and slots.waiting == 0
    for _ in range(3):
        assert await slots.take(0) == 0.0  # all three at once, no wait
    assert slots.taken == 3


async def test_creates_cancelled_at_random_moments_leave_every_start_slot(
    tmp_path: Path,
) -> None:
    """Callers that leave while in line, as their slot is handed over, or while their start
    runs: afterwards max_concurrent_creates creates still start at once."""
    rng = random.Random(61)
    async with fast_petri(tmp_path, max_concurrent_creates=2) as petri:
        slots = petri.controller.manager.create_slots
        for round_ in range(4):
            petri.runtime.starts_open.clear()
            calls = [
                petri.stub.CreateSandbox(create_request(f"r{round_}-{index}"))
                for index in range(12)
            ]
            await wait_until(lambda: petri.runtime.starts_waiting == 2, "two starts at once")
            petri.runtime.starts_open.set()
            for call in calls:
                for _ in range(rng.randrange(6)):
                    await asyncio.sleep(0)
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await wait_until(
                lambda: slots.taken == 0 and slots.waiting == 0, "every slot given back"
            )
        petri.runtime.starts_open.clear()
        last = [asyncio.ensure_future(petri.create(f"last-{index}")) for index in range(2)]
        await wait_until(lambda: petri.runtime.starts_waiting == 2, "two starts at once again")
        petri.runtime.starts_open.set()
        assert [sandbox.state for sandbox in await asyncio.gather(*last)] == [RUNNING] * 2


async def test_one_slow_start_does_not_refuse_every_later_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that took a minute refuses the creates that cannot wait that long, but not
    for good: a refused create starts nothing that could bring the estimate down, so an
    estimate no start confirms loses weight with time."""
    monkeypatch.setattr(creation, "START_ESTIMATE_HALF_LIFE", 0.05, raising=False)
    async with fast_petri(tmp_path) as petri:
        made = petri.controller.manager._creation
        made._start_estimate, made._starts_measured = 60.0, 1  # the one slow start
        made._estimated_at = asyncio.get_running_loop().time()
        refused = petri.stub.CreateSandbox(create_request("early"), timeout=10)
        await expect(refused, grpc.StatusCode.DEADLINE_EXCEEDED, "no time to start a sandbox")
        await asyncio.sleep(1.0)  # time passes with no start: 20 half-lives
        later = await petri.stub.CreateSandbox(create_request("later"), timeout=10)
        assert later.state == RUNNING


async def test_one_projects_flood_of_creates_does_not_hold_anothers_lone_create_behind_it(
    tmp_path: Path,
) -> None:
    """The projects take turns at the start slots: a lone create of another project starts
    after at most one more of the flood's, not after all of them."""
    async with fast_petri(tmp_path, max_concurrent_creates=1) as petri:
        slots = petri.controller.manager.create_slots
        petri.runtime.starts_open.clear()
        flood = [asyncio.ensure_future(petri.create("flood-0"))]
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the flood's first start")
        for index in range(1, 7):
            flood.append(asyncio.ensure_future(petri.create(f"flood-{index}")))
        await wait_until(lambda: slots.waiting == 6, "the flood in line")
        lone = asyncio.ensure_future(
            petri.stub.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent="projects/other", sandbox_id="lone")
            )
        )
        await wait_until(lambda: slots.waiting == 7, "the lone create in line")
        petri.runtime.starts_open.set()
        made = await asyncio.gather(*flood)
        alone = await lone
        started = [name.removeprefix("petri-") for name in petri.runtime.containers]
        assert started.index(alone.uid) <= 2, started.index(alone.uid)
        started.remove(alone.uid)
        assert started == [sandbox.uid for sandbox in made]  # the flood itself in arrival order
        assert slots.taken == 0 and slots.waiting == 0


async def test_a_create_the_quota_cannot_take_even_with_those_in_line_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """The project's quota counts its creates in line: one beyond it is RESOURCE_EXHAUSTED
    now, not after waiting its turn (nor DEADLINE_EXCEEDED in line)."""
    async with fast_petri(tmp_path, max_concurrent_creates=1, max_sandboxes_per_project=2) as petri:
        slots = petri.controller.manager.create_slots
        petri.runtime.starts_open.clear()
        first = asyncio.ensure_future(petri.create("first"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        queued = asyncio.ensure_future(petri.create("queued"))
        await wait_until(lambda: slots.waiting == 1, "the second create in line")
        beyond = petri.stub.CreateSandbox(create_request("beyond"), timeout=5)
        await expect(
            beyond,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "has 1 sandboxes and 1 more being created, its quota of 2",
        )
        assert slots.waiting == 1  # the refused create never queued
        petri.runtime.starts_open.set()
        assert [s.state for s in await asyncio.gather(first, queued)] == [RUNNING] * 2
        assert slots.taken == 0 and slots.waiting == 0
        assert petri.controller.manager._creation._in_line == {}


async def test_a_retry_of_a_create_in_line_gets_its_sandbox_though_it_fills_the_quota(
    tmp_path: Path,
) -> None:
    """A retry sent while its request waits in line is the same request: once the first
    is in (filling the project's quota), the retry gets its sandbox, not RESOURCE_EXHAUSTED,
    and it did not count as one more create in line."""
    async with fast_petri(tmp_path, max_concurrent_creates=1, max_sandboxes_per_project=2) as petri:
        slots = petri.controller.manager.create_slots
        petri.runtime.starts_open.clear()
        first = asyncio.ensure_future(petri.create("first"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first create to start")
        queued = asyncio.ensure_future(petri.create("queued", "r-queued"))
        await wait_until(lambda: slots.waiting == 1, "the second create in line")
        retry = asyncio.ensure_future(petri.create("queued", "r-queued"))
        await wait_until(lambda: slots.waiting == 2, "its retry in line")
        petri.runtime.starts_open.set()
        await first
        made, again = await asyncio.gather(queued, retry)
        assert made.uid == again.uid and made.state == RUNNING
        assert len(petri.runtime.containers) == 2
        assert slots.taken == 0 and slots.waiting == 0


async def test_a_shrinking_pool_never_discards_a_member_being_handed_out() -> None:
    """Members taken for a claim are out of the pool's reach while the target falls; one
    given back unclaimed (its create failed) is discarded only if still beyond the target."""
    now = [0.0]
    starter, discards = Starter(), Discards()
    pool = PoolMembers({FULL: KindBounds(1, 10)}, starter, discards, clock=lambda: now[0])
    pool.start()
    try:
        demand(pool, FULL, 6)
        await until(lambda: pool.count(FULL) == 6 and pool.starting(FULL) == 0)
        in_flight = [pool.take(FULL) for _ in range(3)]
        now[0] = 3600.0  # idle for an hour: back to the minimum
        await next_pass(pool)
        assert pool.target(FULL) == 1
        await until(lambda: pool.count(FULL) == 1 and len(discards.members) >= 2)
        taken = {member.uid for member in in_flight if member is not None}
        assert len(taken) == 3 and not taken & {member.uid for member in discards.members}
        given_back = in_flight[0]
        assert given_back is not None
        pool.give_back(given_back)
        await next_pass(pool)
        await until(lambda: pool.count(FULL) == 1)
        assert {member.uid for member in discards.members} & taken == {given_back.uid}
    finally:
        await pool.close()


async def test_thousands_in_line_are_served_with_the_projects_taking_turns() -> None:
    """3000 waiters of 1000 projects (one of each project's cancelled on the way): each
    project's in arrival order, the projects in turn, then the refills; nothing left."""
    slots = CreateSlots(1)
    await slots.take(None)
    order: list[str] = []

    async def wait(name: str, project: str, refill: bool = False) -> None:
        await slots.take(None, refill=refill, project=project)
        order.append(name)
        slots.release(refill)

    refill = asyncio.ensure_future(wait("refill", "", refill=True))
    waiters = {
        (round_, project): asyncio.ensure_future(wait(f"{project}/{round_}", f"p{project}"))
        for round_ in range(3)
        for project in range(1000)
    }
    await until(lambda: slots.waiting == 3001)
    for project in range(0, 1000, 7):
        waiters[(1, project)].cancel()
    slots.release()
    await asyncio.gather(refill, *waiters.values(), return_exceptions=True)
    left = {
        project: [r for r in range(3) if not (r == 1 and project % 7 == 0)]
        for project in range(1000)
    }
    expected = [  # each turn, every project with a waiter left serves its next one
        f"{project}/{rounds[turn]}"
        for turn in range(3)
        for project, rounds in left.items()
        if turn < len(rounds)
    ]
    assert order == [*expected, "refill"]
    assert slots.taken == 0 and slots.waiting == 0


async def test_a_trickle_of_overlapping_user_starts_does_not_starve_the_refills_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user's start always under way (each next one begins before the last ends), slots
    free all along: a refill waits its patience, then starts beside them, one refill at a
    time; it never goes before a user who waits for a slot."""
    monkeypatch.setattr(quotas, "REFILL_PATIENCE", 0.2, raising=False)
    slots = CreateSlots(4)
    await slots.take(None, project="p")
    first = asyncio.ensure_future(slots.take(None, refill=True))
    second = asyncio.ensure_future(slots.take(None, refill=True))
    loop = asyncio.get_running_loop()

    async def trickle_until(refill: asyncio.Future[float]) -> None:
        """A new user's start, then the last one ends, until `refill` has its slot."""
        began = loop.time()
        while not refill.done():
            assert loop.time() - began < 5.0, "the refill was starved by the trickle"
            await slots.take(None, project="p")
            slots.release()
            await asyncio.sleep(0.01)

    await trickle_until(first)
    assert await first >= 0.2  # not before its patience
    await asyncio.sleep(0.1)  # the second is overdue too, but a refill runs already
    assert not second.done() and slots.taken == 2  # the trickle's start and the first's
    slots.release(refill=True)
    await trickle_until(second)
    # Every slot taken and a user waiting: an overdue refill still goes after the user.
    for _ in range(2):
        await slots.take(None, project="p")
    third = asyncio.ensure_future(slots.take(None, refill=True))
    await until(lambda: slots.waiting == 1)
    user = asyncio.ensure_future(slots.take(None, project="q"))
    await until(lambda: slots.waiting == 2)
    await asyncio.sleep(0.3)  # the third refill is overdue now
    slots.release(refill=True)  # the second refill's slot
    await user
    assert not third.done()
    for _ in range(2):
        slots.release()  # users' starts end; q's is still under way, but none waits
    await third
    slots.release(refill=True)
    for _ in range(2):
        slots.release()
    assert slots.taken == 0 and slots.waiting == 0


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_create_whose_caller_leaves_during_its_start_leaves_nothing(
    tmp_path: Path, how: str
) -> None:
    """Without a request_id nobody can ever be given the sandbox of a create whose caller
    left (cancelled, or its deadline passed: no start was measured yet, so the create was
    let in): once started it is discarded, not left RUNNING in the project's quota, and the
    name is free again. The estimate learned from that start refuses the next such create
    at once."""
    async with fast_petri(tmp_path, max_concurrent_creates=1) as petri:
        slots = petri.controller.manager.create_slots
        lifecycle = petri.controller.manager._lifecycle
        petri.runtime.starts_open.clear()
        call = petri.stub.CreateSandbox(
            create_request("gone"), timeout=0.5 if how == "deadline" else None
        )
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the create to start")
        if how == "cancel":
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call
        petri.runtime.starts_open.set()
        await wait_until(
            lambda: slots.taken == 0 and not lifecycle._provisioning, "the start to end"
        )
        assert petri.runtime.containers == {}
        assert await petri.names() == []
        assert await petri.controller.registry.list_live() == []
        if how == "deadline":
            await expect(
                petri.stub.CreateSandbox(create_request("again"), timeout=0.5),
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "no time to start a sandbox",
            )
            assert petri.runtime.starts == 1  # refused before starting anything
        assert (await petri.create("gone")).state == RUNNING


async def test_a_create_cancelled_as_its_row_goes_in_leaves_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row's insert runs on in the store's thread when its caller leaves: it must not
    stay behind without a start (a PROVISIONING row in the project's quota)."""
    async with fast_petri(tmp_path) as petri:
        registry = petri.controller.manager._lifecycle._registry
        inserted, proceed, cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event()
        real_insert = registry.insert

        async def insert_then_wait(record: Any, quota: int | None = None) -> None:
            await real_insert(record, quota=quota)
            inserted.set()
            try:
                await proceed.wait()  # the caller leaves here: the row is in
            except asyncio.CancelledError:
                cancelled.set()
                raise

        def caller_left() -> bool:
            """The server has seen the cancel: the insert was cancelled, or (shielded from
            it) is being waited for to undo it."""
            undoing = any(
                "_undo_admission" in getattr(task.get_coro(), "__qualname__", "")
                for task in asyncio.all_tasks()
            )
            return cancelled.is_set() or undoing

        monkeypatch.setattr(registry, "insert", insert_then_wait)
        call = petri.stub.CreateSandbox(create_request("torn"))
        await inserted.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(caller_left, "the server to see the cancel")
        proceed.set()
        await wait_until(
            lambda: not petri.controller.manager._creation._in_line, "the create to leave"
        )
        monkeypatch.undo()
        assert await petri.controller.registry.list_live() == []
        assert petri.runtime.starts == 0
        assert (await petri.create("torn")).state == RUNNING


async def test_a_create_cancelled_while_its_pool_member_is_checked_leaks_no_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim first checks that the member answers (a status call): a caller that leaves
    during it leaves the member in the pool, not running in nobody's hands until the
    controller restarts (its expiry would skip it: it is no longer a ready member)."""
    async with fast_petri(tmp_path, warm_pool=(PoolTarget(size=1),)) as petri:
        (member,) = await full_pool(petri, 1)
        pool = petri.controller.manager.warm_pool
        provisioner = petri.controller.manager._provisioner
        checking, cancelled = asyncio.Event(), asyncio.Event()

        async def slow_check(record: Any, timeout: float) -> None:
            checking.set()
            try:
                await asyncio.Event().wait()  # a member slow to answer
            except asyncio.CancelledError:
                cancelled.set()
                raise

        monkeypatch.setattr(provisioner, "check_answers", slow_check)
        call = petri.stub.CreateSandbox(create_request("leaving"))
        await checking.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await cancelled.wait()
        monkeypatch.undo()
        assert member in pool.ready_uids()
        assert (await petri.create("next")).uid == member
