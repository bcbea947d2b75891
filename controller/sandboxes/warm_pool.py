"""The warm pool: sandboxes started and preloaded ahead of any request, per kind of sandbox.

A CreateSandbox whose effective spec (image profile, runtime, resources) matches a pool key
claims a member instead of starting a container; one background task refills the pool, one
sandbox at a time. A member is WARMING while it starts and POOLED once it has preloaded; it
belongs to no project until claimed, so it is invisible to List and counts toward no quota.
A member is handed out at most once: `take` removes it, and nothing ever puts a used sandbox
back. Every member goes when the controller stops: the pool's are the only sandboxes that do
not outlive it.
"""

import asyncio
import collections
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import structlog

from controller.config import Config
from controller.errors import FailedPrecondition, InvalidArgument
from controller.metrics import PoolFigures
from controller.pool_targets import PoolTarget, parse_pool
from controller.records import POOL_PROJECT, Runtime, SandboxRecord, Spec, State
from controller.sandboxes.images import ImageCatalogue
from controller.sandboxes.lifecycle import POOL_STATES, Lifecycle
from controller.sandboxes.provisioner import START_CHECK_INTERVAL, Provisioner
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.shielding import shielded
from controller.sandboxes.specs import SpecPolicy
from controller.store.registry import Registry

__all__ = ["PoolMembers", "PoolTarget", "WarmPool", "parse_pool"]

log = structlog.get_logger()

# After a failed refill of a key, the first pause before the next try; it doubles up to the
# longest, so a missing image does not make the service spin.
RETRY_FIRST = 1.0
RETRY_LONGEST = 60.0
# At shutdown, how long discarding the members may take (a restart removes the rest).
POOL_DRAIN_TIMEOUT = 10.0
# How long a member may take to answer the status call that proves it alive before a claim.
CLAIM_CHECK_TIMEOUT = 1.0


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
    ) -> None:
        self._config = config
        self._registry = registry
        self._policy = policy
        self._images = images
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._quotas = quotas
        self._clock = clock
        self._members = PoolMembers({}, self._start_member)

    def __repr__(self) -> str:
        return f"<WarmPool {self._members!r}>"

    def start(self) -> None:
        """Starts filling the pool (the spec policy must know the host by now)."""
        self._members = PoolMembers(self._sizes(), self._start_member)
        self._members.start()

    def _sizes(self) -> dict[Spec, int]:
        """The pool's keys: each configured target as the spec a create must match."""
        sizes: dict[Spec, int] = {}
        for target in self._config.warm_pool:
            try:
                profile, runtime = self._policy.profile_and_runtime(
                    target.profile, Runtime[target.runtime.upper()] if target.runtime else None
                )
                resources = self._policy.effective_resources(target.resources, runtime)
            except (InvalidArgument, FailedPrecondition) as exc:
                raise ValueError(f"warm_pool entry {target}: {exc}") from exc
            spec = Spec(profile, runtime, resources)
            sizes[spec] = sizes.get(spec, 0) + target.size
        return {spec: size for spec, size in sizes.items() if size > 0}

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
        while (member := await self.take(record.spec)) is not None:
            # Once the claim is written, the sandbox is the caller's even if the caller left:
            # the claim runs on, shielded, so a member is never both claimed and given back.
            claimed = await shielded(self._claim_or_give_back(member, record))
            if claimed is not None:
                return claimed
        return None

    async def take(self, spec: Spec) -> SandboxRecord | None:
        """A ready member of this spec that answers, now the caller's alone (to resume a
        paused sandbox into, or to discard); None when the pool has none ready."""
        while (member := self._members.take(spec)) is not None:
            try:
                await self._provisioner.check_answers(member, CLAIM_CHECK_TIMEOUT)
            except Exception as exc:  # whatever the failure, it is not fit to hand out
                log.warning("a warm pool sandbox does not answer", uid=member.uid, error=str(exc))
                await shielded(self._lifecycle.discard(member, "it did not answer"))
                continue
            return member
        return None

    async def _claim_or_give_back(
        self, member: SandboxRecord, record: SandboxRecord
    ) -> SandboxRecord | None:
        try:
            return await self._lifecycle.claim(member, record)
        except BaseException:  # over quota, name taken: the member is still unused
            self._members.give_back(member)
            raise

    async def remove(self, record: SandboxRecord, why: str) -> None:
        """Discards a member that died or expired, unless a claim or its start holds it:
        those find out for themselves."""
        member = self._members.take_uid(record.uid)
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
        # A slot as users' creates leave one: the pool never takes their place.
        while True:
            if self._quotas.try_take_create_slot():
                break
            await asyncio.sleep(START_CHECK_INTERVAL)
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
            self._quotas.release_create_slot()
        try:
            await self._provisioner.wait_preloaded(member)
            await self._lifecycle.pool(member)
        except BaseException:
            await shielded(self._lifecycle.discard(member, "it did not preload"))
            raise
        return member

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
    """Ready members by spec, and the task that keeps each spec at its size."""

    def __init__(
        self,
        sizes: Mapping[Spec, int],
        start_member: Callable[[Spec], Awaitable[SandboxRecord]],
    ) -> None:
        self._sizes = dict(sizes)
        self._start_member = start_member
        self._ready: dict[Spec, collections.deque[SandboxRecord]] = {
            spec: collections.deque() for spec in self._sizes
        }
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        counts = {spec.image_profile: len(ready) for spec, ready in self._ready.items()}
        return f"<PoolMembers ready={counts}>"

    def start(self) -> None:
        if self._sizes and self._task is None:
            self._task = asyncio.create_task(self._refill_forever(), name="warm-pool")
            self._wanted.set()

    async def close(self) -> list[SandboxRecord]:
        """Stops refilling; returns the members left, for the caller to delete."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
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

    def figures(self) -> list[PoolFigures]:
        return [
            PoolFigures(spec.image_profile, spec.runtime.name.lower(), size, self.count(spec))
            for spec, size in list(self._sizes.items())
        ]

    def ready_uids(self) -> set[str]:
        return {member.uid for ready in self._ready.values() for member in ready}

    async def _refill_forever(self) -> None:
        retry_at: dict[Spec, float] = {}
        pause: dict[Spec, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            for spec, size in self._sizes.items():
                while len(self._ready[spec]) < size and loop.time() >= retry_at.get(spec, 0.0):
                    try:
                        member = await self._start_member(spec)
                    except Exception as exc:
                        wait = pause.get(spec, RETRY_FIRST)
                        pause[spec] = min(RETRY_LONGEST, wait * 2)
                        retry_at[spec] = loop.time() + wait
                        log.warning(
                            "could not start a warm pool sandbox",
                            profile=spec.image_profile,
                            runtime=spec.runtime.name,
                            error=str(exc),
                            retry_in_seconds=wait,
                        )
                        loop.call_later(wait, self._wanted.set)
                        break
                    pause.pop(spec, None)
                    self._ready[spec].append(member)
