import asyncio
from collections.abc import Callable

import pytest

from controller.config import load_config
from controller.pool_targets import PoolTarget, parse_pool
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec
from controller.sandboxes import warm_pool
from controller.sandboxes.warm_pool import PoolMembers
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


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("profile=full", "has no size"),
        ("size=2,colour=red", "unknown keys"),
        ("size=2,runtime=kata", "runtime must be runc or gvisor"),
        ("size=-1", "must not be negative"),
        ("size", "is not key=value"),
        ("size=1,size=2", "sets size twice"),
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
    assert defaults.warm_pool == (PoolTarget(size=2),)
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
