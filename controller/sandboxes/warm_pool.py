"""The warm pool: sandboxes started and preloaded ahead of any request, per kind of sandbox.

A CreateSandbox whose effective spec (image profile, runtime, resources) matches a pool key
claims a member instead of starting a container; a background task refills the pool, several
members at once (up to the host's cores), each start waiting for one of the server's start
slots behind the users' creates. A kind configured with `min=` learns its target from demand
(pool_targets.Demand): it grows after a burst and decays back to its minimum when idle,
within --warm-pool-max members in all and, beyond the minimums, --min-free-memory.

A member is WARMING while it starts and POOLED once it has preloaded; it belongs to no
project until claimed, so it is invisible to List and counts toward no quota.
A member is handed out at most once: `take` removes it, and nothing ever puts a used sandbox
back. Every member goes when the controller stops: the pool's are the only sandboxes that do
not outlive it.
"""

import asyncio
import collections
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from controller.config import Config
from controller.errors import FailedPrecondition, InvalidArgument
from controller.metrics import Metrics, PoolFigures
from controller.pool_targets import Demand, KindBounds, PoolTarget, parse_pool, pool_targets
from controller.records import POOL_PROJECT, Runtime, SandboxRecord, Spec, State
from controller.sandboxes.images import ImageCatalogue
from controller.sandboxes.lifecycle import POOL_STATES, Lifecycle
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.shielding import shielded
from controller.sandboxes.specs import SpecPolicy
from controller.store.registry import Registry

__all__ = ["PoolBudget", "PoolMembers", "PoolTarget", "WarmPool", "parse_pool"]

log = structlog.get_logger()

# After a failed refill of a key, the first pause before the next try; it doubles up to the
# longest, so a missing image does not make the service spin.
RETRY_FIRST = 1.0
RETRY_LONGEST = 60.0
# At shutdown, how long discarding the members may take (a restart removes the rest).
POOL_DRAIN_TIMEOUT = 10.0
# How long a member may take to answer the status call that proves it alive before a claim.
CLAIM_CHECK_TIMEOUT = 1.0
# How often the targets are looked at again without an event: a learned one decays.
RETARGET_INTERVAL = 10.0


def mem_available() -> int | None:
    """The host's MemAvailable in bytes; None where /proc/meminfo does not say."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


@dataclass(frozen=True)
class PoolBudget:
    """What the pool may hold: `total` members in all (ready or starting), and no member
    beyond a kind's minimum while `mem_available()` is below `min_free` bytes."""

    total: int = 1 << 30
    min_free: int = 0
    mem_available: Callable[[], int | None] = mem_available

    def memory_allows_growth(self) -> bool:
        if self.min_free <= 0:
            return True
        available = self.mem_available()
        return available is None or available >= self.min_free


class WarmPool:
    """The whole pool: its keys (from the config's targets), its members' start, claim and
    discard, and its shutdown."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        policy: SpecPolicy,
        images: ImageCatalogue,
        provisioner: Provisioner,
        lifecycle: Lifecycle,
        quotas: Quotas,
        clock: Callable[[], datetime],
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._registry = registry
        self._policy = policy
        self._images = images
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._quotas = quotas
        self._clock = clock
        self._metrics = metrics
        self._members = PoolMembers({}, self._start_member)

    def __repr__(self) -> str:
        return f"<WarmPool {self._members!r}>"

    def start(self) -> None:
        """Starts filling the pool (the spec policy must know the host by now)."""
        self._members = PoolMembers(
            self._bounds(),
            self._start_member,
            self._discard_member,
            PoolBudget(self._config.warm_pool_max, self._config.min_free_memory),
        )
        self._members.start()

    def _bounds(self) -> dict[Spec, KindBounds]:
        """The pool's keys: each configured target as the spec a create must match, with
        its bounds (a fixed size, or a minimum and maximum it learns between)."""
        bounds: dict[Spec, KindBounds] = {}
        for target in self._config.warm_pool:
            try:
                profile, runtime = self._policy.profile_and_runtime(
                    target.profile, Runtime[target.runtime.upper()] if target.runtime else None
                )
                resources = self._policy.effective_resources(target.resources, runtime)
            except (InvalidArgument, FailedPrecondition) as exc:
                raise ValueError(f"warm_pool entry {target}: {exc}") from exc
            spec = Spec(profile, runtime, resources)
            before = bounds.get(spec, KindBounds(0, 0))
            most = target.size
            if target.learns:
                most = max(target.size, target.maximum or self._config.warm_pool_max)
            bounds[spec] = KindBounds(before.minimum + target.size, before.maximum + most)
        return {spec: bound for spec, bound in bounds.items() if bound.maximum > 0}

    def ready_uids(self) -> set[str]:
        return self._members.ready_uids()

    def figures(self) -> list[PoolFigures]:
        """Each pool kind's size and ready members (read by the metrics' HTTP thread: only
        lengths, of containers whose keys are fixed once the pool has started)."""
        return self._members.figures()

    async def claim(self, record: SandboxRecord) -> SandboxRecord | None:
        """The sandbox `record` describes, made of a member of its spec; None when the pool
        has none ready. ResourceExhausted over the project's quota; AlreadyExists when the
        name or the request_id is taken."""
        claimed = None
        while (member := await self._take_answering(record.spec)) is not None:
            # Once the claim is written, the sandbox is the caller's even if the caller left:
            # the claim runs on, shielded, so a member is never both claimed and given back.
            claimed = await shielded(self._claim_or_give_back(member, record))
            if claimed is not None:
                break
        self._demand(record.spec, hit=claimed is not None)
        return claimed

    async def take(self, spec: Spec) -> SandboxRecord | None:
        """A ready member of this spec that answers, now the caller's alone (to resume a
        paused sandbox into, or to discard); None when the pool has none ready."""
        member = await self._take_answering(spec)
        self._demand(spec, hit=member is not None)
        return member

    def _demand(self, spec: Spec, hit: bool) -> None:
        """Counts a create or resume of a pooled kind toward its demand, and its metrics."""
        if not self._members.record_demand(spec):
            return  # not a pooled kind
        kind = (spec.image_profile, spec.runtime.name.lower())
        (self._metrics.pool_hits if hit else self._metrics.pool_misses).labels(*kind).inc()
        if not hit:
            log.info("warm pool miss", profile=kind[0], runtime=kind[1])

    async def _take_answering(self, spec: Spec) -> SandboxRecord | None:
        while (member := self._members.take(spec)) is not None:
            try:
                await self._provisioner.check_answers(member, CLAIM_CHECK_TIMEOUT)
            except Exception as exc:  # whatever the failure, it is not fit to hand out
                log.warning("a warm pool sandbox does not answer", uid=member.uid, error=str(exc))
                await shielded(self._lifecycle.discard(member, "it did not answer"))
                continue
            except BaseException:
                # The caller left (cancelled) during the check: the member is still unused.
                # Else it would be in neither the pool nor anyone's hands: its container
                # would run until the controller restarts, and its expiry would skip it.
                self._members.give_back(member)
                raise
            return member
        return None

    async def _claim_or_give_back(
        self, member: SandboxRecord, record: SandboxRecord
    ) -> SandboxRecord | None:
        try:
            claimed = await self._lifecycle.claim(member, record)
        except BaseException:  # over quota, name taken: the member is still unused
            self._members.give_back(member)
            raise
        if claimed is None:
            # Its row is no member's any more: another node's sweep forgot it while this one
            # missed its heartbeats. Nobody else will end its container.
            await self._lifecycle.discard(member, "its row was forgotten")
        return claimed

    async def remove(self, record: SandboxRecord, why: str) -> None:
        """Discards a member that died or expired, unless a claim or its start holds it:
        those find out for themselves."""
        await self.remove_uid(record.uid, why)

    async def remove_uid(self, uid: str, why: str) -> None:
        """remove(), by the member's uid."""
        member = self._members.take_uid(uid)
        if member is not None:
            log.warning("a warm pool sandbox is discarded", uid=member.uid, why=why)
            await shielded(self._lifecycle.discard(member, why))

    async def _start_member(self, spec: Spec) -> SandboxRecord:
        """Starts a member of this spec; returns it once it has preloaded (POOLED)."""
        if not await self._images.exists(spec.image_profile):
            raise FailedPrecondition(
                f"no image {self._config.image_for(spec.image_profile)}: build it with "
                f"sandbox-image/build.sh {spec.image_profile}"
            )
        # A start slot behind every user's create, once none is under way: the pool never
        # takes their place, nor their cores.
        slots = self._quotas.create_slots
        waited = await slots.take(None, refill=True)
        self._metrics.create_queue_seconds.labels("refill").observe(waited)
        try:
            now = self._clock()
            uid = secrets.token_hex(16)
            container_name, socket_dir = self._provisioner.place(uid)
            member = SandboxRecord(
                uid=uid,
                project=POOL_PROJECT,
                sandbox_id=uid,
                spec=spec,
                state=State.WARMING,
                create_time=now,
                update_time=now,
                # Past it, the reaper discards the member and the pool starts a fresh one.
                expire_time=now + self._config.max_ttl,
                last_active_time=now,
                container_name=container_name,
                socket_dir=socket_dir,
            )
            await self._lifecycle.warm(member)
            member = await asyncio.shield(self._lifecycle.provision(member))
        finally:
            slots.release(refill=True)
        try:
            await self._provisioner.wait_preloaded(member)
            await self._lifecycle.pool(member)
        except BaseException:
            await shielded(self._lifecycle.discard(member, "it did not preload"))
            raise
        return member

    async def _discard_member(self, member: SandboxRecord) -> None:
        log.info("a warm pool sandbox is discarded", uid=member.uid, why="the pool shrank")
        await shielded(self._lifecycle.discard(member, "the pool shrank"))

    async def suspend(self) -> None:
        """Stops refilling and discards the members (a draining node's); start() fills the
        pool again. A member a resume has taken (POOLED, out of the ready list) is the
        resume's; one whose start was cut short (WARMING, no one's) goes."""
        left = await self._members.close()
        for member in left:
            await shielded(self._lifecycle.discard(member, "the node is draining"))
        await self._lifecycle.wait_provisioned()
        for record in await self._registry.list_live():
            if record.state is State.WARMING:
                await shielded(self._lifecycle.discard(record, "the node is draining"))
        if left:
            log.info("warm pool emptied: the node is draining", discarded=len(left))

    async def close(self) -> None:
        """Stops refilling and discards every member, ready or still starting (a start runs
        on, shielded, and is waited for); a restart discards any left after the timeout."""
        left = await self._members.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POOL_DRAIN_TIMEOUT):
                for member in left:
                    await self._lifecycle.discard(member, "the controller stopped")
                await self._lifecycle.wait_provisioned()
                # Members whose start was cut short by the stop, past their provisioning.
                for record in await self._registry.list_live():
                    if record.state in POOL_STATES:
                        await self._lifecycle.discard(record, "the controller stopped")


class PoolMembers:
    """Ready members by spec; the task that keeps each spec at its target, several starts at
    once; and each kind's demand, from which a kind that learns takes its target."""

    def __init__(
        self,
        bounds: Mapping[Spec, KindBounds | int],
        start_member: Callable[[Spec], Awaitable[SandboxRecord]],
        discard_member: Callable[[SandboxRecord], Awaitable[None]] | None = None,
        budget: PoolBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        concurrency: int | None = None,
    ) -> None:
        """`bounds`: each kind's fixed size, or its bounds; `clock`: the demand's seconds;
        `concurrency`: starts at once (default: one per core, so that refills never take
        every core from the running sandboxes)."""
        self._bounds = {
            spec: bound if isinstance(bound, KindBounds) else KindBounds(bound, bound)
            for spec, bound in bounds.items()
        }
        self._start_member = start_member
        self._discard_member = discard_member
        self._budget = budget or PoolBudget()
        self._clock = clock
        self._concurrency = concurrency or len(os.sched_getaffinity(0)) or 1
        self._ready: dict[Spec, collections.deque[SandboxRecord]] = {
            spec: collections.deque() for spec in self._bounds
        }
        self._starting = dict.fromkeys(self._bounds, 0)
        self._targets = {spec: bound.minimum for spec, bound in self._bounds.items()}
        self._demand: Demand[Spec] = Demand()
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._starts: set[asyncio.Task[None]] = set()
        self._discards: set[asyncio.Task[None]] = set()
        # After a failed start of a spec: when to try again (the loop's clock), and the pause.
        self._retry_at: dict[Spec, float] = {}
        self._pause: dict[Spec, float] = {}
        self._memory_short = False
        # Refill passes so far: a test waits for the next one to see what it did.
        self.passes = 0

    def __repr__(self) -> str:
        counts = {spec.image_profile: len(ready) for spec, ready in self._ready.items()}
        return f"<PoolMembers ready={counts} targets={list(self._targets.values())}>"

    def start(self) -> None:
        if self._bounds and self._task is None:
            self._task = asyncio.create_task(self._refill_forever(), name="warm-pool")
            self._wanted.set()

    async def close(self) -> list[SandboxRecord]:
        """Stops refilling; returns the members left, for the caller to delete."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in self._starts:
            task.cancel()
        await asyncio.gather(*self._starts, *self._discards, return_exceptions=True)
        left = [member for ready in self._ready.values() for member in ready]
        for ready in self._ready.values():
            ready.clear()
        return left

    def take(self, spec: Spec) -> SandboxRecord | None:
        """Removes and returns a ready member of this spec, if any; the refill follows."""
        ready = self._ready.get(spec)
        if not ready:
            return None
        self._wanted.set()
        return ready.popleft()

    def record_demand(self, spec: Spec) -> bool:
        """Counts a create or resume of this spec toward its demand; False when the spec is
        not a pool kind (its demand is not learned)."""
        if spec not in self._bounds:
            return False
        self._demand.record(spec, self._clock())
        self._wanted.set()
        return True

    def retarget(self) -> None:
        """Looks at the targets again now (they decay with the clock)."""
        self._wanted.set()

    def give_back(self, member: SandboxRecord) -> None:
        """Returns a member that `take` gave out but that was not claimed (its caller's
        request failed before the claim): it is still unused."""
        self._ready[member.spec].appendleft(member)

    def take_uid(self, uid: str) -> SandboxRecord | None:
        """Removes and returns the ready member `uid` (one that died or expired), if it is
        still ready: a member taken already is its taker's to deal with."""
        for ready in self._ready.values():
            for member in ready:
                if member.uid == uid:
                    ready.remove(member)
                    self._wanted.set()
                    return member
        return None

    def count(self, spec: Spec) -> int:
        return len(self._ready.get(spec, ()))

    def starting(self, spec: Spec) -> int:
        return self._starting.get(spec, 0)

    def target(self, spec: Spec) -> int:
        return self._targets.get(spec, 0)

    def figures(self) -> list[PoolFigures]:
        return [
            PoolFigures(spec.image_profile, spec.runtime.name.lower(), target, self.count(spec))
            for spec, target in list(self._targets.items())
        ]

    def ready_uids(self) -> set[str]:
        return {member.uid for ready in self._ready.values() for member in ready}

    async def _refill_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETARGET_INTERVAL):
                    await self._wanted.wait()
            self._wanted.clear()
            self._retarget()
            self._shrink()
            self._launch()
            self.passes += 1

    def _retarget(self) -> None:
        now = self._clock()
        levels = {spec: self._demand.level(spec, now) for spec in self._bounds}
        for spec, target in pool_targets(self._bounds, levels, self._budget.total).items():
            before = self._targets[spec]
            if target != before:
                self._targets[spec] = target
                log.info("pool target changed", kind=_kind(spec), **{"from": before, "to": target})

    def _shrink(self) -> None:
        """Discards the ready members beyond the target of each kind that learns, oldest
        first (a fixed size keeps a member given back after its replacement started)."""
        if self._discard_member is None:
            return
        for spec, ready in self._ready.items():
            while self._bounds[spec].learns and len(ready) > self._targets[spec]:
                task = asyncio.ensure_future(self._discard_member(ready.popleft()))
                self._discards.add(task)
                task.add_done_callback(self._discards.discard)

    def _launch(self) -> None:
        """Starts members where a kind is below its target, the furthest below first, as
        many at once as the concurrency allows; beyond a kind's minimum only while the
        host's free memory allows."""
        now = asyncio.get_running_loop().time()
        growth_allowed: bool | None = None  # read once a pass, when needed
        while sum(self._starting.values()) < self._concurrency:
            candidates = []
            for spec, target in self._targets.items():
                have = len(self._ready[spec]) + self._starting[spec]
                if have >= target or now < self._retry_at.get(spec, 0.0):
                    continue
                if have >= self._bounds[spec].minimum:
                    if growth_allowed is None:
                        growth_allowed = self._memory_allows_growth()
                    if not growth_allowed:
                        continue
                candidates.append((target - have, spec))
            if not candidates:
                return
            spec = max(candidates, key=lambda candidate: candidate[0])[1]
            self._starting[spec] += 1
            task = asyncio.create_task(self._start(spec))
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)

    def _memory_allows_growth(self) -> bool:
        allowed = self._budget.memory_allows_growth()
        if allowed == self._memory_short:  # it changed: say so once
            self._memory_short = not allowed
            log.info(
                "the warm pool stops growing beyond its minimums: the host's available memory "
                "is below --min-free-memory"
                if not allowed
                else "the warm pool may grow again: the host's available memory is enough",
                min_free_bytes=self._budget.min_free,
            )
        return allowed

    async def _start(self, spec: Spec) -> None:
        loop = asyncio.get_running_loop()
        try:
            member = await self._start_member(spec)
        except Exception as exc:
            wait = self._pause.get(spec, RETRY_FIRST)
            self._pause[spec] = min(RETRY_LONGEST, wait * 2)
            self._retry_at[spec] = loop.time() + wait
            log.warning(
                "could not start a warm pool sandbox",
                profile=spec.image_profile,
                runtime=spec.runtime.name,
                error=str(exc),
                retry_in_seconds=wait,
            )
            loop.call_later(wait, self._wanted.set)
            return
        finally:
            self._starting[spec] -= 1
            self._wanted.set()  # room for another start
        self._pause.pop(spec, None)
        self._ready[spec].append(member)


def _kind(spec: Spec) -> str:
    return f"{spec.image_profile}/{spec.runtime.name.lower()}"
