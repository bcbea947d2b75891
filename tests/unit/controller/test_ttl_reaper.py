from datetime import datetime, timedelta

from controller.records import SandboxRecord
from controller.sandboxes.reaper import TtlReaper
from controller.store.registry import Registry
from tests.unit.controller.test_registry import T0, record


class RecordingManager:
    """Stands in for the sandbox manager: records what the reaper asks it to expire."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.expired: list[str] = []

    async def check_containers(self) -> None:
        pass

    async def hibernate_idle(self) -> None:
        pass

    async def expire(self, sandbox: SandboxRecord) -> None:
        self.expired.append(sandbox.sandbox_id)
        await self.registry.set_fields(sandbox.uid, delete_time=T0, delete_reason="expired")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


async def test_expires_due_sandboxes_in_expiry_order_and_never_early(registry: Registry) -> None:
    for sandbox_id, minutes in [("late", 30), ("first", 5), ("second", 10)]:
        await registry.insert(record(sandbox_id, expire_time=T0 + timedelta(minutes=minutes)))
    manager = RecordingManager(registry)
    clock = Clock()
    reaper = TtlReaper(manager, registry, timedelta(seconds=1), timedelta(days=7), clock)

    clock.now = T0 + timedelta(minutes=5) - timedelta(microseconds=1)
    await reaper.reap_expired()
    assert manager.expired == []
    clock.now = T0 + timedelta(minutes=20)
    await reaper.reap_expired()
    assert manager.expired == ["first", "second"]
    await reaper.reap_expired()
    assert manager.expired == ["first", "second"]


async def test_old_tombstones_are_forgotten(registry: Registry) -> None:
    await registry.insert(record("gone"))
    await registry.set_fields("uid-gone", delete_time=T0, delete_reason="deleted")
    clock = Clock()
    reaper = TtlReaper(
        RecordingManager(registry),
        registry,
        timedelta(seconds=1),
        timedelta(days=7),
        clock,
    )
    clock.now = T0 + timedelta(days=6)
    await reaper.purge_tombstones()
    assert await registry.get_latest_tombstone("p", "gone") is not None
    clock.now = T0 + timedelta(days=8)
    await reaper.purge_tombstones()
    assert await registry.get_latest_tombstone("p", "gone") is None
