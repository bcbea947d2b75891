import asyncio
from collections.abc import Callable

import pytest

from controller.config import load_config
from controller.pool_targets import (
    DEMAND_HALF_LIFE,
    DEMAND_HOLD,
    Demand,
    KindBounds,
    PoolTarget,
    parse_pool,
    pool_targets,
)
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec
from controller.sandboxes import warm_pool
from controller.sandboxes.warm_pool import PoolBudget, PoolMembers
from tests.unit.controller.test_registry import record

FULL = Spec("full", Runtime.RUNC, Resources(disk_bytes=1 << 30))
SMALL = Spec("test", Runtime.GVISOR, Resources(memory_bytes=1 << 30))


def test_pool_entries_parse_into_targets() -> None:
    assert parse_pool("") == ()
    assert parse_pool("size=2") == (PoolTarget(size=2),)
    assert parse_pool(
        " size=2,profile=full ; size=1,profile=test,runtime=gvisor,memory=1GiB,"
        "disk=512MiB,processes=64,cpu=500"
    ) == (
        PoolTarget(size=2, profile="full"),
        PoolTarget(1, "test", "gvisor", Resources(500, 1 << 30, 512 << 20, 64)),
    )
    assert parse_pool("min=2") == (PoolTarget(size=2, learns=True),)
    assert parse_pool("min=1,max=8,profile=full") == (
        PoolTarget(1, "full", learns=True, maximum=8),
    )
    for text in ("size=2", "min=2", "min=1,max=8,profile=full,runtime=gvisor,cpu=500"):
        assert parse_pool(str(parse_pool(text)[0])) == parse_pool(text)  # round trip


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("profile=full", "has no size"),
        ("size=2,colour=red", "unknown keys"),
        ("size=2,runtime=kata", "runtime must be runc or gvisor"),
        ("size=-1", "must not be negative"),
        ("size", "is not key=value"),
        ("size=1,size=2", "sets size twice"),
        ("size=1,min=1", "has no size"),
        ("size=2,max=4", "max goes with min"),
        ("min=4,max=2", "max must be at least min"),
    ],
)
def test_bad_pool_entries_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_pool(text)


def test_the_pool_and_preload_are_configured_from_the_environment() -> None:
    config = load_config(
        [], {"PETRI_WARM_POOL": "size=3,profile=test", "PETRI_PRELOAD": "numpy, scipy.stats"}
    )
    assert config.warm_pool == (PoolTarget(size=3, profile="test"),)
    assert config.preload == ("numpy", "scipy.stats")
    assert load_config([], {"PETRI_PRELOAD": ""}).preload == ()
    defaults = load_config([], {})
    assert defaults.warm_pool == (PoolTarget(size=2, learns=True),)  # learns, never below 2
    assert defaults.preload == ("numpy", "pandas", "matplotlib.pyplot")
    with pytest.raises(SystemExit):
        load_config(["--preload", "os; rm -rf /"], {})


class Starter:
    """Starts fake members; fails while `failing` is set."""

    def __init__(self) -> None:
        self.started: list[SandboxRecord] = []
        self.failing = False

    async def __call__(self, spec: Spec) -> SandboxRecord:
        await asyncio.sleep(0)
        if self.failing:
            raise RuntimeError("no image")
        member = record(f"m{len(self.started)}", project=POOL_PROJECT, spec=spec)
        self.started.append(member)
        return member


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


async def test_the_pool_fills_each_key_and_refills_after_a_take() -> None:
    starter = Starter()
    pool = PoolMembers({FULL: 2, SMALL: 1}, starter)
    pool.start()
    try:
        await until(lambda: pool.count(FULL) == 2 and pool.count(SMALL) == 1)
        first = pool.take(FULL)
        second = pool.take(FULL)
        assert first is not None and second is not None and first.uid != second.uid
        await until(lambda: pool.count(FULL) == 2)
        assert len(starter.started) == 5
        assert {first.uid, second.uid}.isdisjoint(pool.ready_uids())  # never handed out twice
        assert pool.take(Spec("other", Runtime.RUNC, Resources())) is None
    finally:
        assert len(await pool.close()) == 3


async def test_a_member_given_back_is_next_and_one_taken_by_uid_is_replaced() -> None:
    starter = Starter()
    pool = PoolMembers({FULL: 2}, starter)
    pool.start()
    try:
        await until(lambda: pool.count(FULL) == 2)
        member = pool.take(FULL)
        assert member is not None
        pool.give_back(member)
        assert pool.take(FULL) is member  # first in line again
        await until(lambda: pool.count(FULL) == 2)
        assert len(starter.started) == 3
        dropped = sorted(pool.ready_uids())[0]
        taken = pool.take_uid(dropped)
        assert taken is not None and taken.uid == dropped
        assert pool.take_uid(dropped) is None  # handed out once
        await until(lambda: pool.count(FULL) == 2)
        assert dropped not in pool.ready_uids()
    finally:
        await pool.close()


async def test_failed_starts_back_off_then_recover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm_pool, "RETRY_FIRST", 0.05)
    starter = Starter()
    starter.failing = True
    calls = 0
    original = starter.__call__

    async def counting(spec: Spec) -> SandboxRecord:
        nonlocal calls
        calls += 1
        return await original(spec)

    pool = PoolMembers({FULL: 1}, counting)
    pool.start()
    try:
        await asyncio.sleep(0.3)
        assert 2 <= calls <= 4  # 0.05, 0.1, 0.2 s apart: no busy loop
        starter.failing = False
        await until(lambda: pool.count(FULL) == 1)
    finally:
        await pool.close()


class GatedStarter(Starter):
    """Starts members once `gate` is open, counting how many start at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_at_once = 0

    async def __call__(self, spec: Spec) -> SandboxRecord:
        self.in_flight += 1
        self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            await self.gate.wait()
            return await super().__call__(spec)
        finally:
            self.in_flight -= 1


class Discards:
    def __init__(self) -> None:
        self.members: list[SandboxRecord] = []

    async def __call__(self, member: SandboxRecord) -> None:
        self.members.append(member)


def demand(pool: PoolMembers, spec: Spec, creates: int) -> None:
    """`creates` creates of `spec` at once: each takes a member if one is ready."""
    for _ in range(creates):
        pool.take(spec)
        assert pool.record_demand(spec)


async def next_pass(pool: PoolMembers) -> None:
    """Waits for a refill pass that starts after now."""
    passes = pool.passes
    pool.retarget()
    await until(lambda: pool.passes > passes)


async def test_a_pool_that_learns_grows_after_a_burst_in_parallel_and_decays_to_its_minimum() -> (
    None
):
    now = [0.0]
    starter, discards = GatedStarter(), Discards()
    pool = PoolMembers(
        {FULL: KindBounds(2, 12)}, starter, discards, clock=lambda: now[0], concurrency=3
    )
    pool.start()
    try:
        await until(lambda: pool.count(FULL) == 2)
        assert pool.target(FULL) == 2
        starter.gate.clear()
        demand(pool, FULL, 8)  # a burst of 8: 2 hits, 6 misses
        await until(lambda: starter.in_flight == 3)  # refills in parallel, up to 3 at once
        assert pool.target(FULL) == 8
        starter.gate.set()
        await until(lambda: pool.count(FULL) == 8)
        assert starter.most_at_once == 3 and len(starter.started) == 10
        kept = [member.uid for member in starter.started[-8:]]
        now[0] = DEMAND_HOLD  # the peak holds a while
        await next_pass(pool)
        assert pool.target(FULL) == 8 and pool.count(FULL) == 8
        now[0] = DEMAND_HOLD + DEMAND_HALF_LIFE  # then halves every half-life
        await next_pass(pool)
        assert pool.target(FULL) == 4
        await until(lambda: pool.count(FULL) == 4 and len(discards.members) == 4)
        assert [member.uid for member in discards.members] == kept[:4]  # oldest first
        now[0] = 3600.0  # an hour idle: back to the minimum, never below
        await next_pass(pool)
        assert pool.target(FULL) == 2
        await until(lambda: pool.count(FULL) == 2)
        assert len(starter.started) == 10  # shrinking starts nothing
        figures = pool.figures()
        assert [(kind.profile, kind.target, kind.ready) for kind in figures] == [("full", 2, 2)]
    finally:
        await pool.close()


async def test_a_fixed_size_does_not_learn() -> None:
    starter = Starter()
    pool = PoolMembers({FULL: 2}, starter, Discards())
    pool.start()
    try:
        await until(lambda: pool.count(FULL) == 2)
        demand(pool, FULL, 10)
        await next_pass(pool)
        assert pool.target(FULL) == 2
        await until(lambda: pool.count(FULL) == 2 and pool.starting(FULL) == 0)
        assert len(starter.started) == 4  # refilled the 2 taken, no more
        assert not pool.record_demand(Spec("other", Runtime.RUNC, Resources()))  # not pooled
    finally:
        await pool.close()


async def test_a_pool_that_learns_stays_within_its_budget() -> None:
    """--warm-pool-max members in all (the minimums first, then the kinds in their order),
    and no member beyond a kind's minimum while MemAvailable is below --min-free-memory."""
    free = [4 << 30]
    budget = PoolBudget(total=5, min_free=2 << 30, mem_available=lambda: free[0])
    starter = Starter()
    pool = PoolMembers(
        {FULL: KindBounds(1, 10), SMALL: KindBounds(1, 10)},
        starter,
        Discards(),
        budget,
        clock=lambda: 0.0,
    )
    pool.start()
    try:
        await until(lambda: pool.count(FULL) == 1 and pool.count(SMALL) == 1)
        demand(pool, FULL, 10)
        demand(pool, SMALL, 10)
        await next_pass(pool)
        assert (pool.target(FULL), pool.target(SMALL)) == (4, 1)
        await until(lambda: pool.count(FULL) == 4 and pool.count(SMALL) == 1)
        free[0] = 1 << 30  # below the floor: refills up to the minimum only
        for _ in range(4):
            assert pool.take(FULL) is not None
        await until(lambda: pool.count(FULL) == 1 and pool.starting(FULL) == 0)
        await next_pass(pool)
        assert pool.count(FULL) == 1 and pool.starting(FULL) == 0
        assert pool.target(FULL) == 4  # the target stands: only the growth waits
        free[0] = 3 << 30
        await next_pass(pool)
        await until(lambda: pool.count(FULL) == 4)
        assert pool.count(FULL) + pool.count(SMALL) == 5
    finally:
        await pool.close()


def test_the_learned_level_is_the_recent_peak_decaying_by_half_lives() -> None:
    levels: Demand[str] = Demand()
    for tick in range(40):  # 4 a second for 10 s: 20 within the window, like a burst of 20
        levels.record("k", tick * 0.25)
    assert levels.level("k", 9.75) == 20
    assert levels.level("k", 9.75 + DEMAND_HOLD) == 20
    assert levels.level("k", 9.75 + DEMAND_HOLD + DEMAND_HALF_LIFE) == pytest.approx(10)
    levels.record("k", 9.75 + DEMAND_HOLD + DEMAND_HALF_LIFE)  # one create: below the level
    assert levels.level("k", 9.75 + DEMAND_HOLD + 2 * DEMAND_HALF_LIFE) == pytest.approx(5)
    bounds = {"a": KindBounds(2, 20), "b": KindBounds(3, 3)}
    assert pool_targets(bounds, {"a": 30.0, "b": 9.0}, 24) == {"a": 20, "b": 3}
    assert pool_targets(bounds, {"a": 30.0}, 10) == {"a": 7, "b": 3}
    assert pool_targets(bounds, {"a": 0.2}, 24) == {"a": 2, "b": 3}


def test_the_pool_budget_is_configured_and_a_large_fixed_pool_still_loads() -> None:
    config = load_config(
        ["--warm-pool", "size=30", "--warm-pool-max", "8", "--min-free-memory", "1GiB"], {}
    )
    assert (config.warm_pool, config.warm_pool_max) == ((PoolTarget(size=30),), 8)
    assert config.min_free_memory == 1 << 30
    bounds = {"fixed": KindBounds(30, 30), "learns": KindBounds(1, 10)}
    assert pool_targets(bounds, {"learns": 9.0}, 8) == {"fixed": 30, "learns": 1}
