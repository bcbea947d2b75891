"""Every change of a sandbox's state, in one place: docs/lifecycle.md draws them.

    admit       (nothing)                    -> PROVISIONING  a CreateSandbox's row
    warm        (nothing)                    -> WARMING       a warm pool member's row
    provision   PROVISIONING                 -> RUNNING       its container answers
                WARMING                      -> WARMING       (the pool waits for its preload)
    pool        WARMING                      -> POOLED        preloaded: ready to claim
    claim       POOLED                       -> RUNNING       a CreateSandbox takes a member
    terminate   RUNNING                      -> TERMINATED    its container or executor died
    pause       RUNNING                      -> PAUSED        saved: its container goes
    recover     RUNNING                      -> PAUSED        its container died; it was saved
    resume      PAUSED                       -> RUNNING       restored into a container
    unrestorable PAUSED                      -> TERMINATED    its checkpoint cannot be restored
    deprovision RUNNING, TERMINATED, ...     -> DEPROVISIONING -> DELETED (a tombstone)
    discard     PROVISIONING, WARMING, POOLED -> (no row)     never anyone's sandbox

Steps that must not be abandoned half-way run shielded from the caller's cancellation (the
callers shield them: `provision` returns a future that runs on), so a client that gives up
never leaves a container without a row, or a row without its container. Every write is a
targeted one (Registry.set_fields): a transition never undoes another field's change.
"""

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import structlog

from controller.errors import Cancelled, FailedPrecondition
from controller.records import POOL_PROJECT, CheckpointInfo, LostName, SandboxRecord, State
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.quotas import Quotas
from controller.store.checkpoints import CheckpointStore
from controller.store.registry import Registry
from petri.v1 import executor_pb2

log = structlog.get_logger()

# The states of a warm pool member: it belongs to no project (POOL_PROJECT) until claimed.
POOL_STATES = frozenset({State.WARMING, State.POOLED})
# The states of a sandbox no caller was ever given: they leave no tombstone.
UNOWNED_STATES = POOL_STATES | {State.PROVISIONING}


def checked_incarnation(value: str) -> str:
    """An incarnation the executor reported, or "invalid": its words are the sandbox's."""
    ok = 0 < len(value) <= 32 and all(c in "0123456789abcdef" for c in value)
    return value if ok else "invalid"


class Lifecycle:
    def __init__(
        self,
        registry: Registry,
        provisioner: Provisioner,
        quotas: Quotas,
        clock: Callable[[], datetime],
        checkpoints: CheckpointStore,
    ) -> None:
        self._registry = registry
        self._provisioner = provisioner
        self._checkpoints = checkpoints
        self._quotas = quotas
        self._clock = clock
        # Counting a project's sandboxes and adding one happen together, per project.
        self._project_locks: dict[str, asyncio.Lock] = {}
        # Sandboxes being provisioned, by uid: a retried Create or a Delete waits for them.
        self._provisioning: dict[str, asyncio.Future[SandboxRecord]] = {}

    def __repr__(self) -> str:
        return f"<Lifecycle provisioning={len(self._provisioning)}>"

    def provisioning(self, uid: str) -> "asyncio.Future[SandboxRecord] | None":
        """The provisioning under way of sandbox `uid`, if any."""
        return self._provisioning.get(uid)

    async def wait_provisioned(self) -> None:
        """Waits for every provisioning under way to end, however it ends."""
        await asyncio.gather(*self._provisioning.values(), return_exceptions=True)

    # --- into existence -------------------------------------------------------------------

    async def admit(self, record: SandboxRecord) -> None:
        """Adds a CreateSandbox's PROVISIONING row, within its project's quota.
        ResourceExhausted over the quota; AlreadyExists when its name or request_id is taken."""
        async with self._project_locks.setdefault(record.project, asyncio.Lock()):
            # Counted by the registry, atomically with the insert: other controllers sharing
            # the registry add sandboxes too.
            await self._registry.insert(record, quota=self._quotas.max_sandboxes_per_project)

    async def check_room(self, project: str, starting: Callable[[], int]) -> None:
        """ResourceExhausted when the project's live sandboxes and `starting()` more being
        created (counted under the lock that admit's rows are added under) fill its quota."""
        async with self._project_locks.setdefault(project, asyncio.Lock()):
            live = await self._registry.count_live(project)
            self._quotas.check_sandbox_count(project, live, starting())

    async def warm(self, record: SandboxRecord) -> None:
        """Adds a warm pool member's WARMING row: no project's, counted toward no quota."""
        assert record.state is State.WARMING and record.project == POOL_PROJECT
        await self._registry.insert(record)

    def provision(
        self, record: SandboxRecord, abandoned: Callable[[], bool] = lambda: False
    ) -> "asyncio.Future[SandboxRecord]":
        """Starts the sandbox of a PROVISIONING or WARMING row; the future runs on if its
        caller leaves (shield it), and ends RUNNING (a member: still WARMING) or, on failure,
        discarded: it never existed for its caller, whose retry may start afresh. Discarded
        too (Cancelled) when `abandoned()` says, once started, that nobody will ever be given
        it."""
        future = asyncio.ensure_future(self._provision(record, abandoned))
        self._provisioning[record.uid] = future
        future.add_done_callback(lambda _: self._provisioning.pop(record.uid, None))
        return future

    async def _provision(
        self, record: SandboxRecord, abandoned: Callable[[], bool]
    ) -> SandboxRecord:
        try:
            status: executor_pb2.ExecutorStatus = await self._provisioner.provision(record)
        except BaseException:
            await self._registry.forget(record.uid)  # the provisioner released the rest
            raise
        if abandoned():  # still PROVISIONING: nobody has seen it RUNNING
            await self.discard(record, "its create's caller left before it was ready")
            raise Cancelled(f"the caller of {record.name}'s create left: it was discarded")
        started_from = record.state
        if record.state is State.PROVISIONING:
            record.state = State.RUNNING
        record.incarnation = checked_incarnation(status.incarnation)
        record.update_time = self._clock()
        if not await self._registry.set_fields_in(
            record.uid,
            started_from,
            state=record.state,
            incarnation=record.incarnation,
            update_time=record.update_time,
        ):
            # Given up while it started: another node's sweep judged this one dead (its
            # heartbeats stopped: frozen, cut off) and TERMINATED it, or forgot a warm pool
            # member's row. Any node answers for it now: it must not come back to life here.
            await self._provisioner.release(record)
            raise FailedPrecondition(
                f"sandbox {record.name} was given up while it started (this node missed its "
                "heartbeats): it is TERMINATED and its container was removed; delete it and "
                "create a new sandbox",
                reason="SANDBOX_TERMINATED",
            )
        log.info("sandbox created", sandbox=record.name, uid=record.uid, state=record.state.name)
        return record

    async def pool(self, member: SandboxRecord) -> None:
        """WARMING -> POOLED: the member has preloaded and may be claimed. FailedPrecondition
        when its row is gone (a sweep forgot it while this node missed its heartbeats): the
        caller discards it."""
        member.update_time = self._clock()
        if not await self._registry.set_fields_in(
            member.uid, State.WARMING, state=State.POOLED, update_time=member.update_time
        ):
            raise FailedPrecondition(f"warm pool member {member.uid} has no row any more")
        member.state = State.POOLED

    async def claim(self, member: SandboxRecord, claimed: SandboxRecord) -> SandboxRecord | None:
        """POOLED -> RUNNING: the member becomes the sandbox `claimed` describes (its owner's
        name, labels, expiry...), within the project's quota; None when it is no longer a
        POOLED member. ResourceExhausted over the quota; AlreadyExists when the name or
        the request_id is taken. Shield it: once written, the sandbox is its caller's."""
        owned = replace(
            claimed,
            uid=member.uid,
            container_name=member.container_name,
            socket_dir=member.socket_dir,
            state=State.RUNNING,
            incarnation=member.incarnation,
        )
        async with self._project_locks.setdefault(owned.project, asyncio.Lock()):
            done = await self._registry.claim_pool_member(  # POOLED -> RUNNING, as admit's
                member.uid,
                quota=self._quotas.max_sandboxes_per_project,
                project=owned.project,
                sandbox_id=owned.sandbox_id,
                display_name=owned.display_name,
                labels=owned.labels,
                expire_time=owned.expire_time,
                auto_pause_after=owned.auto_pause_after,
                request_id=owned.request_id,
                create_request=owned.create_request,
                create_time=owned.create_time,
                update_time=owned.update_time,
                last_active_time=owned.last_active_time,
            )
        if not done:
            return None
        log.info("sandbox created from the warm pool", sandbox=owned.name, uid=owned.uid)
        return owned

    # --- out of it ------------------------------------------------------------------------

    async def terminate(self, record: SandboxRecord, why: str) -> None:
        """RUNNING -> TERMINATED: its container or its executor died; `why` says which, to
        the caller (state_message). Its row and container name stay until it is deleted.
        Nothing when it is no longer RUNNING: a delete under way (DEPROVISIONING) stays one."""
        if not await self._registry.set_fields_in(
            record.uid,
            State.RUNNING,
            state=State.TERMINATED,
            state_message=why,
            update_time=self._clock(),
        ):
            return
        await self._provisioner.drop_client(record.uid)
        log.warning("sandbox terminated", sandbox=record.name, why=why)

    async def pause(self, record: SandboxRecord, checkpoint: CheckpointInfo) -> bool:
        """RUNNING -> PAUSED once its checkpoint is on disk; its container and everything
        it held go (in the background). False when it is no longer RUNNING (deleted or
        terminated meanwhile). Shield it."""
        if not await self._registry.set_fields_in(
            record.uid,
            State.RUNNING,
            state=State.PAUSED,
            state_message="",
            checkpoint=checkpoint,
            restore_report=None,
            update_time=self._clock(),
        ):
            return False
        # Its state is on disk: the container may go after the caller has its answer.
        self._provisioner.release_soon(record)
        log.info("sandbox paused", sandbox=record.name, bytes=checkpoint.size_bytes)
        return True

    async def recover(self, record: SandboxRecord, why: str) -> bool:
        """RUNNING -> PAUSED for a sandbox whose container died or vanished and that has a
        checkpoint: its next execution resumes from it; `why` says so (state_message).
        False when it is no longer RUNNING. Shield it."""
        if not await self._registry.set_fields_in(
            record.uid,
            State.RUNNING,
            state=State.PAUSED,
            state_message=why,
            restore_report=None,
            update_time=self._clock(),
        ):
            return False
        # Tracked from this very step (no await between the write and it): a resume that reads
        # the new state waits for this release before it takes the same names.
        self._provisioner.release_soon(record)
        log.warning("sandbox recovered from its checkpoint", sandbox=record.name, why=why)
        return True

    async def resume(
        self,
        record: SandboxRecord,
        into: SandboxRecord,
        incarnation: str,
        execution_count: int,
        report: tuple[LostName, ...],
    ) -> bool:
        """PAUSED -> RUNNING in the container `into` names (restored already); `report` is
        for its next execution's response. False when it is no longer PAUSED (deleted
        meanwhile): the caller releases the container. Shield it."""
        now = self._clock()
        return await self._registry.set_fields_in(
            record.uid,
            State.PAUSED,
            state=State.RUNNING,
            state_message="",
            container_name=into.container_name,
            socket_dir=into.socket_dir,
            incarnation=checked_incarnation(incarnation),
            execution_count=max(record.execution_count, min(max(execution_count, 0), 2**62)),
            restore_report=report,
            last_active_time=now,  # a resume is use: auto-pause counts from it
            update_time=now,
        )

    async def unrestorable(self, record: SandboxRecord, why: str) -> None:
        """PAUSED -> TERMINATED: its checkpoint cannot be restored (damaged, or made by
        another version); `why` says so. Nothing when it is no longer PAUSED."""
        if await self._registry.set_fields_in(
            record.uid,
            State.PAUSED,
            state=State.TERMINATED,
            state_message=why,
            update_time=self._clock(),
        ):
            log.warning("sandbox terminated", sandbox=record.name, why=why)

    async def deprovision(self, record: SandboxRecord, reason: str) -> bool:
        """-> DEPROVISIONING -> DELETED: removes the sandbox's container and leaves a
        tombstone that says when and why (`reason`: "deleted", "expired"). Nothing, and False,
        when it was deleted by someone else meanwhile, or no longer names the node `record`
        names (a drain moved it: its new node holds its container and checkpoint). Shield it."""
        if not await self._registry.set_fields_held(
            record.uid, record.node, state=State.DEPROVISIONING, update_time=self._clock()
        ):
            return False
        await self.finish_deprovisioning(record, reason)
        return True

    async def finish_deprovisioning(self, record: SandboxRecord, reason: str) -> None:
        """DEPROVISIONING -> DELETED (also for one a previous controller left half-way)."""
        await self._provisioner.release(record)
        await self._checkpoints.remove(record.uid)
        await self._registry.tombstone(record.uid, reason, self._clock())
        log.info("sandbox deleted", sandbox=record.name, reason=reason)

    async def discard(self, record: SandboxRecord, why: str) -> None:
        """PROVISIONING, WARMING or POOLED -> no row: removes a sandbox no caller was ever
        given (a warm pool member, a create that failed with a previous controller), its
        container and its row: it leaves no tombstone. Shield it."""
        await self._provisioner.release(record)
        await self._registry.forget(record.uid)
        log.info("sandbox discarded", uid=record.uid, why=why)
