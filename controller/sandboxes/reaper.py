"""The TTL reaper: deletes sandboxes once their expire_time has come (paused ones too: a TTL
counts paused time), forgets old tombstones, watches containers, and pauses and saves idle
sandboxes. Runs on APScheduler in the controller's event loop.

A sandbox is never deleted before its expire_time, and at most `reap_interval` (plus the time
deletions take) after it; sandboxes are taken in the order they expire.
"""

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from controller.clock import utcnow
from controller.records import SandboxRecord
from controller.store.registry import Registry

log = structlog.get_logger()

# Sandboxes deleted per round at most; the rest wait for the next round (a second later).
BATCH = 100


class Expirer(Protocol):
    """What the reaper needs of the sandbox manager."""

    async def expire(self, record: SandboxRecord) -> None: ...

    async def check_containers(self) -> None: ...

    async def hibernate_idle(self) -> None: ...


class Membership(Protocol):
    """What a node (role node) does beside its own sandboxes, on the reaper's schedule."""

    @property
    def heartbeat_interval(self) -> timedelta: ...

    async def heartbeat(self) -> None:
        """Tells the registry this node lives, with its figures."""

    async def sweep_dead(self) -> None:
        """Terminates the sandboxes of nodes that stopped heartbeating, if no other node's
        sweep is under way (one lock across the nodes)."""

    async def purge_tombstones(self, deleted_before: datetime) -> int | None:
        """The registry's purge, under that lock; None when another node holds it."""


class TtlReaper:
    def __init__(
        self,
        manager: Expirer,
        registry: Registry,
        interval: timedelta,
        tombstone_retention: timedelta,
        clock: Callable[[], datetime] = utcnow,
        watch_interval: timedelta = timedelta(seconds=2),
        hibernate_interval: timedelta = timedelta(seconds=5),
        membership: Membership | None = None,
    ) -> None:
        self._membership = membership
        self._watch_interval = watch_interval
        self._hibernate_interval = hibernate_interval
        self._manager = manager
        self._registry = registry
        self._interval = interval
        self._retention = tombstone_retention
        self._clock = clock
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self.reaped = 0

    def __repr__(self) -> str:
        return f"<TtlReaper every={self._interval} reaped={self.reaped}>"

    def start(self) -> None:
        # max_instances=1 and coalesce: a slow round is never overlapped by the next one.
        self._scheduler.add_job(
            self.reap_expired,
            "interval",
            seconds=self._interval.total_seconds(),
            max_instances=1,
            coalesce=True,
            next_run_time=self._clock(),
        )
        self._scheduler.add_job(self.purge_tombstones, "interval", hours=1, max_instances=1)
        self._scheduler.add_job(
            self.check_containers,
            "interval",
            seconds=self._watch_interval.total_seconds(),
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            self.hibernate_idle,
            "interval",
            seconds=self._hibernate_interval.total_seconds(),
            max_instances=1,
            coalesce=True,
        )
        if self._membership is not None:
            self._scheduler.add_job(
                self.heartbeat,
                "interval",
                seconds=self._membership.heartbeat_interval.total_seconds(),
                max_instances=1,
                coalesce=True,
                next_run_time=self._clock(),
            )
            self._scheduler.add_job(
                self.sweep_dead,
                "interval",
                seconds=self._interval.total_seconds(),
                max_instances=1,
                coalesce=True,
            )
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:  # stopping twice is stopping once
            self._scheduler.shutdown(wait=False)

    async def reap_expired(self) -> None:
        try:
            due = await self._registry.list_expired(self._clock(), BATCH)
            for record in due:
                await self._manager.expire(record)
                self.reaped += 1
                log.info(
                    "sandbox expired", sandbox=record.name, expire_time=str(record.expire_time)
                )
        except Exception:
            log.exception("reaping expired sandboxes failed; retrying next round")

    async def check_containers(self) -> None:
        try:
            await self._manager.check_containers()
        except Exception:
            log.exception("checking sandbox containers failed; retrying next round")

    async def hibernate_idle(self) -> None:
        try:
            await self._manager.hibernate_idle()
        except Exception:
            log.exception("pausing or saving idle sandboxes failed; retrying next round")

    async def keep_beating(self) -> None:
        """Heartbeats (role node) until cancelled, after stop(): while the controller stops,
        pausing its sandboxes for minutes maybe, the other nodes must not judge it dead."""
        if self._membership is None:
            return
        while True:
            await self.heartbeat()
            await asyncio.sleep(self._membership.heartbeat_interval.total_seconds())

    async def heartbeat(self) -> None:
        assert self._membership is not None
        try:
            await self._membership.heartbeat()
        except Exception:
            log.exception("the heartbeat failed; retrying next round")

    async def sweep_dead(self) -> None:
        assert self._membership is not None
        try:
            await self._membership.sweep_dead()
        except Exception:
            log.exception("sweeping dead nodes' sandboxes failed; retrying next round")

    async def purge_tombstones(self) -> None:
        try:
            before = self._clock() - self._retention
            # Among nodes, one purges at a time.
            purged = (
                await self._registry.purge_tombstones(before)
                if self._membership is None
                else await self._membership.purge_tombstones(before)
            )
            if purged:
                log.info("forgot old tombstones", count=purged)
        except Exception:
            log.exception("purging tombstones failed; retrying next round")
